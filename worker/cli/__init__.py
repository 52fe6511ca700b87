"""The command line's adapters: the ``appattest`` worker-side commands (``commands``), resumable
runs of re-verification and bulk import (``runs``), JSON Lines input, reports and progress."""

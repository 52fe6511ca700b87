"""``python -m appattest``: the ``appattest`` command."""

from appattest.cli import main

main()

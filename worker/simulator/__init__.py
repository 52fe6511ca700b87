"""Fake App Attest devices under a throwaway CA, and ``appattest simulate``, which runs them
against a live service.

This is test equipment shipped with the package so that an operator can try a deployment
without a phone. Nothing in the verifier trusts the throwaway CA: a service accepts its
devices only when its root is passed explicitly with ``--root-ca`` (or ``APPATTEST_ROOT_CA``).
"""

"""The launcher: the ``appattest`` command line, composing the HTTP producer and the workers.

It is the one module that sees both rings: ``producer`` uses ``worker``'s contract and
settings, ``worker`` knows nothing of ``producer``, and the commands that run the API (``api``)
or the API with a worker (``serve``) live here, above both.
"""

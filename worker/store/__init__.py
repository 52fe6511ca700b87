"""Persistence of device keys through SQLAlchemy: models, repository functions, migrations."""

"""Storage: client API keys and control policies, on SQLite or PostgreSQL.

``engine`` turns a database URL into an async engine and translates driver errors into
``StorageError``; ``models`` declares the tables, ``migrations`` creates them (Alembic),
``init_db`` applies the migrations; ``keys`` and ``policies`` are the repositories the
proxy and the command line (``commands``) use.
"""

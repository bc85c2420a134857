"""Alembic environment: the URL comes from ``service.db.migrate`` (``cfg.attributes``) or,
when run as ``alembic upgrade head``, from the same ``ROBUSTACT_*`` settings as the app."""

from logging.config import fileConfig

from alembic import context

from robustact.service.db import Base, make_engine, migration_lock

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def database_url() -> str:
    url = config.attributes.get("database_url")
    if url:
        return url
    from robustact.service.settings import Settings

    return Settings().database_url


def run_migrations_offline() -> None:
    context.configure(url=database_url(), target_metadata=Base.metadata, literal_binds=True,
                      dialect_opts={"paramstyle": "named"}, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = database_url()
    engine = make_engine(url)
    try:
        # One process at a time (service.db.migration_lock); the others then find nothing to do.
        with migration_lock(url), engine.connect() as connection:
            context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()

"""Connection pools against the real PostgreSQL (127.0.0.1:5432), MariaDB (3306) and Redis (6379) of the
machine (DESIGN §8): no mocks, and a missing service fails these tests rather than skipping them.

Each pool kind is driven past its size -- max 2 connections, six concurrent holders -- and scraped over
HTTP mid-flight: exactly 2 used, 0 idle, max 2 and 4 pending.  Afterwards: every acquire's wait observed,
used back to 0, a short timeout counted, and the series gone once the pool is closed."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import gc
import threading
import time

import pytest
from conftest import free_port, sample, scrape

import loopwatch

PG = "postgresql://postgres@127.0.0.1:5432/postgres"
HOLD = 1.0  # seconds each holder keeps its connection (pg_sleep / BLPOP timeout / sleep)
HOLDERS = 6
SIZE = 2


def _install() -> str:
    agent = loopwatch.install(metrics_port=free_port(), metrics_addr="127.0.0.1", namespace="lwpool",
                              service="pools", lag_thresholds=(10.0,), gil_probe_interval=0)
    assert agent.metrics_url is not None
    return agent.metrics_url


def _pool_values(url: str, name: str) -> dict[str, float | None]:
    samples = scrape(url)
    p = "lwpool_db_client_connection_"
    return {
        "used": sample(samples, p + "count", pool_name=name, state="used"),
        "idle": sample(samples, p + "count", pool_name=name, state="idle"),
        "max": sample(samples, p + "max", pool_name=name),
        "pending": sample(samples, p + "pending_requests", pool_name=name),
        "waits": sample(samples, p + "wait_time_seconds_count", pool_name=name),
        "wait_sum": sample(samples, p + "wait_time_seconds_sum", pool_name=name),
        "uses": sample(samples, p + "use_time_seconds_count", pool_name=name),
        "timeouts": sample(samples, p + "timeouts_total", pool_name=name),
        "overflow": sample(samples, p + "overflow", pool_name=name),
    }


def _mid_flight(url: str, name: str, *, pending: int = HOLDERS - SIZE) -> dict[str, float | None]:
    """Scrape until the holders are all in (the first ones hold, the others wait); return that scrape."""
    deadline = time.monotonic() + 10
    while True:
        values = _pool_values(url, name)
        if values["pending"] == pending or time.monotonic() > deadline:
            return values
        time.sleep(0.05)


def _check_mid(values: dict, *, size: int = SIZE, pending: int = HOLDERS - SIZE) -> None:
    assert (values["used"], values["idle"], values["max"], values["pending"]) == (size, 0, size, pending), values


def _check_after(values: dict, *, acquires: int = HOLDERS) -> None:
    assert values["used"] == 0 and values["pending"] == 0, values
    assert values["waits"] == acquires and values["uses"] == acquires, values
    # the holders that waited: 2 at once, 2 after ~HOLD, 2 after ~2*HOLD
    assert values["wait_sum"] > 0.8 * HOLD * (2 * 1 + 2 * 2), values


async def _scrape_async(url: str, name: str, **kwargs) -> dict:
    return await asyncio.get_running_loop().run_in_executor(None, lambda: _mid_flight(url, name, **kwargs))


# -- asyncpg ----------------------------------------------------------------------------------------
def test_asyncpg_pool() -> None:
    import asyncpg

    async def main() -> None:
        url = _install()
        pool = loopwatch.watch_pool(await asyncpg.create_pool(PG, min_size=1, max_size=SIZE), "apg")

        async def hold() -> None:
            async with pool.acquire() as conn:
                await conn.execute(f"select pg_sleep({HOLD})")

        tasks = [asyncio.create_task(hold()) for _ in range(HOLDERS)]
        _check_mid(await _scrape_async(url, "apg"))
        await asyncio.gather(*tasks)
        _check_after(_pool_values(url, "apg"))

        async with pool.acquire(), pool.acquire():
            with pytest.raises(asyncio.TimeoutError):
                await pool.acquire(timeout=0.2)
        assert _pool_values(url, "apg")["timeouts"] == 1
        await pool.close()
        assert _pool_values(url, "apg")["used"] is None  # closed: its series are gone

    asyncio.run(main())


# -- psycopg_pool ---------------------------------------------------------------------------------------
def test_psycopg_connection_pool_with_threads() -> None:
    import psycopg_pool

    url = _install()
    pool = loopwatch.watch_pool(psycopg_pool.ConnectionPool(PG, min_size=SIZE, max_size=SIZE, open=True), "pg-sync")
    pool.wait()

    def hold() -> None:
        with pool.connection() as conn:
            conn.execute(f"select pg_sleep({HOLD})")

    with cf.ThreadPoolExecutor(HOLDERS) as threads:
        futures = [threads.submit(hold) for _ in range(HOLDERS)]
        _check_mid(_mid_flight(url, "pg-sync"))
        for future in futures:
            future.result()
    _check_after(_pool_values(url, "pg-sync"))

    first, second = pool.getconn(), pool.getconn()
    with pytest.raises(psycopg_pool.PoolTimeout):
        pool.getconn(timeout=0.2)
    pool.putconn(first)
    pool.putconn(second)
    assert _pool_values(url, "pg-sync")["timeouts"] == 1
    pool.close()
    assert _pool_values(url, "pg-sync")["used"] is None


def test_psycopg_async_connection_pool() -> None:
    import psycopg_pool

    async def main() -> None:
        url = _install()
        pool = psycopg_pool.AsyncConnectionPool(PG, min_size=SIZE, max_size=SIZE, open=False)
        await pool.open(wait=True)
        loopwatch.watch_pool(pool, "pg-async")

        async def hold() -> None:
            async with pool.connection() as conn:
                await conn.execute(f"select pg_sleep({HOLD})")

        tasks = [asyncio.create_task(hold()) for _ in range(HOLDERS)]
        _check_mid(await _scrape_async(url, "pg-async"))
        await asyncio.gather(*tasks)
        _check_after(_pool_values(url, "pg-async"))
        async with pool.connection(), pool.connection():
            with pytest.raises(psycopg_pool.PoolTimeout):
                await pool.getconn(timeout=0.2)
        assert _pool_values(url, "pg-async")["timeouts"] == 1
        await pool.close()
        assert _pool_values(url, "pg-async")["used"] is None

    asyncio.run(main())


# -- SQLAlchemy -----------------------------------------------------------------------------------------
def test_sqlalchemy_engine_queue_pool_with_overflow() -> None:
    import sqlalchemy as sa

    url = _install()
    engine = sa.create_engine(PG.replace("postgresql://", "postgresql+psycopg://"), pool_size=1, max_overflow=1,
                              pool_timeout=30)
    loopwatch.watch_pool(engine, "sa-sync")

    def hold() -> None:
        with engine.connect() as conn:
            conn.execute(sa.text(f"select pg_sleep({HOLD})"))

    with cf.ThreadPoolExecutor(HOLDERS) as threads:
        futures = [threads.submit(hold) for _ in range(HOLDERS)]
        values = _mid_flight(url, "sa-sync")
        _check_mid(values)
        assert values["overflow"] == 1, values  # pool_size 1 + 1 overflow connection
        for future in futures:
            future.result()
    _check_after(_pool_values(url, "sa-sync"))

    short = sa.create_engine(PG.replace("postgresql://", "postgresql+psycopg://"), pool_size=1, max_overflow=0,
                             pool_timeout=0.2)
    loopwatch.watch_pool(short, "sa-short")
    with short.connect():
        with pytest.raises(sa.exc.TimeoutError):
            short.connect()
    assert _pool_values(url, "sa-short")["timeouts"] == 1
    short.dispose()

    engine.dispose()  # a new pool replaces the old one: still watched
    with engine.connect() as conn:
        conn.execute(sa.text("select 1"))
    assert _pool_values(url, "sa-sync")["waits"] == HOLDERS + 1
    engine.dispose()  # closes the pooled connection; the engine itself stays until it is dropped
    assert _pool_values(url, "sa-sync")["idle"] == 0
    del engine, conn
    gc.collect()
    assert _pool_values(url, "sa-sync")["used"] is None  # the engine was collected: its series are gone


def test_sqlalchemy_async_engine() -> None:
    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import create_async_engine

    async def main() -> None:
        url = _install()
        engine = create_async_engine(PG.replace("postgresql://", "postgresql+asyncpg://"), pool_size=SIZE,
                                     max_overflow=0)
        loopwatch.watch_pool(engine, "sa-async")

        async def hold() -> None:
            async with engine.connect() as conn:
                await conn.execute(sa.text(f"select pg_sleep({HOLD})"))

        tasks = [asyncio.create_task(hold()) for _ in range(HOLDERS)]
        values = await _scrape_async(url, "sa-async")
        _check_mid(values)
        assert values["overflow"] == 0
        await asyncio.gather(*tasks)
        _check_after(_pool_values(url, "sa-async"))
        await engine.dispose()

    asyncio.run(main())


@pytest.mark.parametrize("poolclass, expected_max", [("NullPool", None), ("StaticPool", 1.0)])
def test_sqlalchemy_null_and_static_pools(poolclass: str, expected_max: float | None) -> None:
    import sqlalchemy as sa
    import sqlalchemy.pool

    url = _install()
    engine = sa.create_engine(PG.replace("postgresql://", "postgresql+psycopg://"),
                              poolclass=getattr(sqlalchemy.pool, poolclass))
    loopwatch.watch_pool(engine, "sa-plain")
    with engine.connect() as conn:
        conn.execute(sa.text("select 1"))
        values = _pool_values(url, "sa-plain")
        assert values["used"] == 1 and values["max"] == expected_max, values
    values = _pool_values(url, "sa-plain")
    assert values["used"] == 0 and values["waits"] == 1 and values["uses"] == 1, values
    engine.dispose()


# -- Redis --------------------------------------------------------------------------------------------------
def test_redis_blocking_pool_sync_with_threads() -> None:
    import redis

    url = _install()
    pool = redis.BlockingConnectionPool(host="127.0.0.1", port=6379, max_connections=SIZE, timeout=30)
    client = redis.Redis(connection_pool=pool)
    loopwatch.watch_pool(client, "redis-sync")  # a client: its pool is watched
    key = f"loopwatch-test-{time.time_ns()}"

    with cf.ThreadPoolExecutor(HOLDERS) as threads:
        futures = [threads.submit(client.blpop, [key], HOLD) for _ in range(HOLDERS)]
        _check_mid(_mid_flight(url, "redis-sync"))
        for future in futures:
            assert future.result() is None  # nothing pushed: each BLPOP held its connection HOLD s
    _check_after(_pool_values(url, "redis-sync"))

    short = redis.BlockingConnectionPool(host="127.0.0.1", port=6379, max_connections=1, timeout=0.2)
    loopwatch.watch_pool(short, "redis-short")
    held = short.get_connection()
    with pytest.raises(redis.exceptions.ConnectionError, match="No connection available"):
        short.get_connection()
    short.release(held)
    assert _pool_values(url, "redis-short")["timeouts"] == 1
    pool.disconnect()
    short.disconnect()


def test_redis_asyncio_pools() -> None:
    import redis.asyncio as aioredis

    async def main() -> None:
        url = _install()
        pool = aioredis.BlockingConnectionPool(host="127.0.0.1", port=6379, max_connections=SIZE, timeout=30)
        client = aioredis.Redis(connection_pool=pool)
        loopwatch.watch_pool(pool, "redis-async")
        key = f"loopwatch-test-{time.time_ns()}"
        tasks = [asyncio.create_task(client.blpop([key], HOLD)) for _ in range(HOLDERS)]
        _check_mid(await _scrape_async(url, "redis-async"))
        assert await asyncio.gather(*tasks) == [None] * HOLDERS
        _check_after(_pool_values(url, "redis-async"))

        # A plain pool never waits (past its limit it raises at once): used/idle/max are still right.
        plain = aioredis.ConnectionPool(host="127.0.0.1", port=6379, max_connections=5)
        other = aioredis.Redis(connection_pool=plain)
        loopwatch.watch_pool(plain, "redis-plain")
        holders = [asyncio.create_task(other.blpop([key], HOLD)) for _ in range(3)]
        values = await _scrape_async(url, "redis-plain", pending=0)
        deadline = time.monotonic() + 5
        while values["used"] != 3 and time.monotonic() < deadline:
            values = await _scrape_async(url, "redis-plain", pending=0)
        assert (values["used"], values["max"], values["pending"]) == (3, 5, 0), values
        await asyncio.gather(*holders)
        values = _pool_values(url, "redis-plain")
        assert (values["used"], values["idle"], values["waits"]) == (0, 3, 3), values
        await client.aclose()
        await other.aclose()
        await pool.aclose()
        await plain.aclose()

    asyncio.run(main())


# -- aiopg, aiomysql ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("driver", ["aiopg", "aiomysql"])
def test_aiopg_and_aiomysql_pools(driver: str) -> None:
    async def main() -> None:
        url = _install()
        if driver == "aiopg":
            import aiopg

            pool = await aiopg.create_pool("dbname=postgres user=postgres host=127.0.0.1", minsize=1, maxsize=SIZE)
            sleep = f"select pg_sleep({HOLD})"
        else:
            import aiomysql

            pool = await aiomysql.create_pool(host="127.0.0.1", port=3306, user="root", password="", db="test",
                                              minsize=1, maxsize=SIZE)
            sleep = f"select sleep({HOLD})"
        loopwatch.watch_pool(pool, driver)

        async def hold() -> None:
            async with pool.acquire() as conn:
                async with conn.cursor() as cursor:
                    await cursor.execute(sleep)

        tasks = [asyncio.create_task(hold()) for _ in range(HOLDERS)]
        _check_mid(await _scrape_async(url, driver))
        await asyncio.gather(*tasks)
        _check_after(_pool_values(url, driver))
        pool.close()
        await pool.wait_closed()
        assert _pool_values(url, driver)["used"] is None

    asyncio.run(main())


# -- what watch_pool refuses ----------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [object(), threading.Lock(), "postgresql://"])
def test_watch_pool_refuses_unknown_objects_listing_what_it_supports(registry, tmp_path, bad) -> None:
    loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path)
    with pytest.raises(loopwatch.ConfigError) as info:
        loopwatch.watch_pool(bad, "x")
    message = str(info.value)
    assert message.startswith("watch_pool() does not know ")
    for supported in ("asyncpg.Pool", "psycopg_pool.ConnectionPool", "psycopg_pool.AsyncConnectionPool",
                      "sqlalchemy Engine, AsyncEngine", "redis.BlockingConnectionPool", "aiopg.Pool"):
        assert supported in message, message


def test_watch_pool_name_and_agent_are_checked(registry, tmp_path) -> None:
    import redis

    pool = redis.ConnectionPool()
    with pytest.raises(RuntimeError, match="not installed"):
        loopwatch.watch_pool(pool, "r")
    loopwatch.install(registry=registry, metrics_port=0, dump_dir=tmp_path)
    with pytest.raises(loopwatch.ConfigError, match="name must be a non-empty printable string"):
        loopwatch.watch_pool(pool, "")
    assert loopwatch.watch_pool(pool, "r") is pool
    assert "get_connection" in vars(pool)
    loopwatch.uninstall()
    assert "get_connection" not in vars(pool)  # uninstall() gives the pool its own methods back

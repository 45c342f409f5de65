"""A tiny asyncio trading bot with the bug every asyncio service has once: a synchronous HTTP call
inside an ``async def`` handler (see ``handlers/commands.py`` and ``servos/xai_integration.py``).

It exists for ``examples/demo.py``; it has no dependency beyond the standard library.
"""

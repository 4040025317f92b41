"""``outrider collector ...`` and the operators' commands (``outrider models``, ``rollout``, ...).

Each ``*_cli`` module registers its commands (listed in ``agent.cli.OPTIONAL_COMMANDS``);
``cli`` holds the shared client helpers, ``cli_format`` the output formats,
``serve_cli`` starts the collector. May import every other room; none imports it.
"""

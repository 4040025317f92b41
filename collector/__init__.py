"""The collector, in rooms whose imports run one way (docs/architecture.md, tests/test_architecture.py):

cli -> api -> web -> monitoring -> lifecycle -> store -> base; every room may import ``agent`` and ``protos``.
"""

"""A model's life in the registry: versions, gates, approvals, rollouts, rollbacks, retraining.

Plain cores over the store: the registry and its artifacts, the release gate,
approvals and their withdrawal, rollouts and shadows (pushed through a
``Pusher`` handed in from above), rollback policies, retraining policies.
May import ``collector.store`` and ``collector.base``; never monitoring, api, cli or web.
"""

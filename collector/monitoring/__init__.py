"""Watching what the fleet serves: drift, effect, estimates, evaluation, alerts, webhooks.

The evaluation loop reads merged spans, decides drift and performance verdicts,
raises alerts and sends webhooks, and asks ``collector.lifecycle`` for
retraining or rollbacks. May import ``collector.lifecycle``, ``collector.store``
and ``collector.base``; never api, cli or web.
"""

"""Evaluation: run task suites with lwm and baselines, locally or on Ray, and write reports.

    lwm eval --suite babyai-goto --agents lwm,bot,random --episodes 200 --out reports/goto

`collect` holds the `Collector` interface (the same map over episodes in-process or on a Ray
cluster, identical results for the same seeds); the other modules build on it.
"""

"""Xintu's benchmark harness: ``python -m bench [scenario ...] [--quick]``.

It starts everything it needs (the service on a temporary data directory and a free
loopback port, the fake LLM upstream, the store, the baselines), drives open-loop and
closed-loop load from several generator processes, stops everything, and writes
``bench/results/<timestamp>/`` (``results.json``, ``results.md``, PNG plots).

Modules, in the order a run uses them:

- :mod:`bench.__main__`: the command line and the run loop;
- :mod:`bench._facts`: machine facts and package versions, printed and stored;
- :mod:`bench._photos`: realistic JPEGs from scikit-image's photos, made distinct cheaply;
- :mod:`bench._context`: what every scenario gets (settings, generator, children);
- :mod:`bench._services`: child processes (service, hello-world, fake LLM), the store;
- :mod:`bench.hello_app`: the framework baseline, served like ``xintu serve``;
- :mod:`bench._inproc`: bare onnxruntime and the classifier's path in-process;
- :mod:`bench._http` and :mod:`bench._loadgen`: a lean HTTP/1.1 client and the load
  generator (open loop on a schedule, and closed loop), in several processes;
- :mod:`bench._stats`: percentiles, goodput, lateness, timelines;
- :mod:`bench._plots` and :mod:`bench._report`: PNGs, JSON and the Markdown table;
- :mod:`bench.scenarios`: one module per scenario.
"""

"""Benchmark rlm_mlflow's MLflowSink against what users would pick instead.

Run it with ``scripts/bench`` (see ``scripts/bench --help``). The modules:

- ``cli``: the command line, which sections run, the report file;
- ``plan``: how big each measurement is (full, quick, smoke) and the named regimes;
- ``sections``: each section of the benchmark, as the parent process runs it;
- ``tasks``: what runs inside each child process, one function per kind of measurement;
- ``child``: the child process's entry point (``python -m benchkit.child SPEC``);
- ``workloads``: what an agent does, as data, and the drivers that replay it through a sink;
- ``baselines``: the seed's synchronous sink, MLflow's async logging, no sink, and ours;
- ``harness``: the server, the proxy, child processes, read-back from MLflow, machine load;
- ``measure``: latency summaries, peak RSS, HTTP request counts, queue depth sampling;
- ``report``: the markdown report, section by section, and the latency plot;
- ``targets``: the targets table, its verdicts, and the evidence that a regime was entered;
- ``fmt``: number formatting and markdown tables.

The benchmark uses rlm_mlflow's public API only: ``MLflowSink`` and its keyword arguments, the
hooks, ``flush()``, ``close()``, ``status()``, and ``rlm_mlflow.testing``.
"""

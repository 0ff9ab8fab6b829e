"""Times the serving engine's steps, for finding where inter-token gaps come from
(docs/serving.md, "Inter-token latency, repeated"). Put this folder first on
PYTHONPATH and set STEPLOG; every Python process started so (the load generator and the
server it starts) appends to ``$STEPLOG.<pid>``:

* ``step <start> <ms> rows=<decode rows> calls=[((rows, width), [chunk tokens]), ...]
  parts={method: ms}``: one ``Engine._step``, its prefill calls, and the time spent in
  the engine methods it calls (``_run`` starts the step's programs; ``_take_tokens``
  waits for the last step's tokens; the rest of ``ms`` is mostly the wait for a first
  token of a prompt finished in this step);
* ``gc <time> <ms> gen<N>``: a cyclic garbage collection over 1 ms.

``GC_OFF=1`` turns the cyclic collector off instead (``gc.disable()``). The engine
module is wrapped when it is first imported; nothing else changes.

    PYTHONPATH=benchmarks/step_log:$PYTHONPATH STEPLOG=/tmp/steps \\
        python benchmarks/serving_benchmark.py --random-shape llama-8b ...
"""
import gc
import importlib.abc
import importlib.machinery
import os
import sys
import time

TIMED = ("_admit", "_run", "_take_tokens", "_take_token", "_prefilled", "_program",
         "_decode_inputs", "_prefill_inputs", "_args")


def _timed(method):
    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            parts = self.__dict__.setdefault("_log_parts", {})
            parts[method.__name__] = (parts.get(method.__name__, 0.)
                                      + (time.perf_counter() - start) * 1e3)
    return timed


def _wrap(engine_class, log) -> None:
    step, plan = engine_class._step, engine_class._prefill_calls

    def _prefill_calls(self):
        calls = plan(self)
        self._log_calls = [(tuple(shape), [tokens for _, tokens in chunks])
                           for shape, chunks in calls]
        return calls

    def _step(self):
        self._log_calls, self._log_parts = [], {}
        start = time.perf_counter()
        worked = step(self)
        ms = (time.perf_counter() - start) * 1e3
        rows = len(self._in_flight[0]) if self._in_flight else 0
        parts = {name: round(value, 2) for name, value in self._log_parts.items()}
        log.write(f"step {start:.6f} {ms:.3f} rows={rows} calls={self._log_calls} "
                  f"parts={parts}\n")
        return worked

    engine_class._step, engine_class._prefill_calls = _step, _prefill_calls
    for name in TIMED:
        setattr(engine_class, name, _timed(getattr(engine_class, name)))


class _EngineHook(importlib.abc.MetaPathFinder):
    """Wraps ``kvjax.serve.engine.Engine`` once the module is loaded."""

    def __init__(self, log):
        self.log = log

    def find_spec(self, name, path, target=None):
        if name != "kvjax.serve.engine":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            _wrap(module.Engine, self.log)

        spec.loader.exec_module = exec_module
        return spec


def _log_collections(log) -> None:
    started = {}

    def collected(phase, info):
        now = time.perf_counter()
        if phase == "start":
            started["at"] = now
        elif now - started.get("at", now) > 1e-3:
            log.write(f"gc {now:.6f} {(now - started['at']) * 1e3:.3f} "
                      f"gen{info['generation']}\n")

    gc.callbacks.append(collected)


if os.environ.get("GC_OFF") == "1":
    gc.disable()
if os.environ.get("STEPLOG"):
    _log = open(f"{os.environ['STEPLOG']}.{os.getpid()}", "a", buffering=1)
    _log_collections(_log)
    sys.meta_path.insert(0, _EngineHook(_log))

"""Times a training script from outside: run by the script's own venv's python (ours, or the Paddle venv's).

    python reference_wrapper.py SPEC.json

SPEC holds ``framework`` ("torch" or "paddle"), ``script``, ``argv`` (the script's arguments), ``result`` (where to
write the timings as JSON), ``sys_path`` (folders the script imports from besides its own) and ``threads`` (null: the
framework's own default; a number: the parent has set OMP_NUM_THREADS/MKL_NUM_THREADS, and Paddle is told as well).
``framework_threads`` in the result is the count the framework uses: torch.get_num_threads(), or Paddle's
OMP_NUM_THREADS as its import left it.

The wrapper registers its hooks, then runs the script as ``python script.py argv...`` would (``runpy.run_path`` with
``run_name="__main__"``, the script's folder first on ``sys.path``). Nothing of the script changes. Hooks:

- the start of step 1: the first forward call of any ``torch.nn.Module`` / ``paddle.nn.Layer`` in the process (both
  reference scripts call none before their loop: the first is the VAE encoding step 1's batch); the hook removes
  itself, so later steps pay nothing for it;
- the end of each step: after every optimizer step (torch: ``register_optimizer_step_post_hook``; Paddle: a wrapper
  around the ``step`` methods of ``paddle.optimizer``'s classes, counted once when they call one another).

Stdlib and the script's framework only: it runs in venvs that have nothing of textinv.
"""

from __future__ import annotations

import json
import os
import resource
import runpy
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

EVENTS: dict[str, Any] = {"wrapper_started": time.time(), "step_ends": [], "step_cpu": []}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def mark_first_forward() -> None:
    EVENTS["first_forward"] = time.time()
    EVENTS["first_forward_cpu"] = cpu_seconds()


def mark_step_end() -> None:
    EVENTS["step_ends"].append(time.time())
    EVENTS["step_cpu"].append(cpu_seconds())


def os_threads() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def hook_torch() -> Callable[[], dict[str, Any]]:
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    handle: list[Any] = []

    def first_forward(module: Any, args: Any) -> None:
        handle.pop().remove()
        mark_first_forward()

    handle.append(torch.nn.modules.module.register_module_forward_pre_hook(first_forward))
    register_optimizer_step_post_hook(lambda optimizer, args, kwargs: mark_step_end())
    return lambda: {"framework_threads": torch.get_num_threads(), "framework_version": torch.__version__}


def hook_paddle(threads: Any) -> Callable[[], dict[str, Any]]:
    import paddle

    # Paddle's import sets OMP_NUM_THREADS to 1 unless it is set (paddle/base/__init__.py, __bootstrap__): its default
    # of one core. What it left there is the count its OpenMP kernels use.
    omp_threads = int(os.environ.get("OMP_NUM_THREADS", "0"))
    if threads is not None:
        paddle.base.core.set_num_threads(int(threads))  # its math library's count too (MKL / OpenBLAS)
    layer_call = paddle.nn.Layer.__call__

    def first_call(self: Any, *args: Any, **kwargs: Any) -> Any:
        paddle.nn.Layer.__call__ = layer_call  # once: later calls go straight to Paddle's
        mark_first_forward()
        return layer_call(self, *args, **kwargs)

    paddle.nn.Layer.__call__ = first_call
    depth = [0]

    def timed(step: Callable[..., Any]) -> Callable[..., Any]:
        def step_and_mark(*args: Any, **kwargs: Any) -> Any:
            depth[0] += 1
            try:
                return step(*args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    mark_step_end()

        return step_and_mark

    for cls in optimizers_with_own_step(paddle):
        cls.step = timed(cls.__dict__["step"])
    return lambda: {"framework_threads": omp_threads, "framework_version": paddle.__version__}


def optimizers_with_own_step(paddle: Any) -> list[Any]:
    """paddle.optimizer's classes that define ``step`` themselves (Optimizer, Adam, AdamW, LBFGS in Paddle 3.3)."""
    classes = [getattr(paddle.optimizer, name) for name in dir(paddle.optimizer)]
    base = paddle.optimizer.Optimizer
    return [cls for cls in classes if isinstance(cls, type) and issubclass(cls, base) and "step" in vars(cls)]


def main(spec_file: str) -> int:
    with open(spec_file, encoding="utf-8") as handle:
        spec = json.load(handle)
    script = os.path.abspath(spec["script"])
    facts = hook_torch() if spec["framework"] == "torch" else hook_paddle(spec.get("threads"))
    EVENTS["imported"] = time.time()
    # As `python script.py` sees it: the script's folder first, the wrapper's own folder not at all.
    sys.path[0] = os.path.dirname(script)
    sys.path[1:1] = spec.get("sys_path", [])
    sys.argv = [script, *spec["argv"]]
    code: Any = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        code = stop.code
    except BaseException:  # the script's own failure: its traceback, as python would print it
        traceback.print_exc()
        code = 1
    finally:
        EVENTS.update(finished=time.time(), finished_cpu=cpu_seconds(), os_threads=os_threads(), **facts())
        with open(spec["result"], "w", encoding="utf-8") as handle:
            json.dump(EVENTS, handle)
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)  # SystemExit("message"), as the interpreter reports it
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

"""`ftkit ARGS...` exactly as the console script runs it, plus the timestamps bench/vs_trl.py needs: an import
hook patches transformers' CallbackHandler when ftkit first imports it (import order and ftkit's code path stay
as they are) to print `BENCH <event> <step> <unix time>` at the first two step starts and at the end of
training, and to pin torch to one thread as the baseline does.

    OMP_NUM_THREADS=1 python bench/ftkit_timed.py train RECIPE.yml --no-cache
"""

import importlib.abc
import importlib.util
import sys
import time

MODULE = "transformers.trainer_callback"


def stamp(event: str, step: int, extra: str = "") -> None:
    print(f"BENCH {event} {step} {time.time():.6f}{extra}", file=sys.stderr, flush=True)


def patch(module) -> None:
    import torch

    torch.set_num_threads(1)
    handler = module.CallbackHandler
    step_begin, train_end = handler.on_step_begin, handler.on_train_end

    def on_step_begin(self, args, state, control):
        if state.global_step < 2:
            stamp("step_begin", state.global_step, f" threads={torch.get_num_threads()}")
        return step_begin(self, args, state, control)

    def on_train_end(self, args, state, control):
        stamp("train_end", state.global_step)
        return train_end(self, args, state, control)

    handler.on_step_begin, handler.on_train_end = on_step_begin, on_train_end


class PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


if __name__ == "__main__":
    sys.meta_path.insert(0, PatchOnImport())
    sys.argv = ["ftkit", *sys.argv[1:]]
    from ftkit.cli import main

    main()

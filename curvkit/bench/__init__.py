r"""``curvkit bench``: every registered method beside SGD and AdamW on small bundled tasks.

Each *run* trains one model (one task, one method, one seed) for a fixed number of steps
with the ordinary loop ``zero_grad(); curvature_backward(output, y); loss.backward();
step()`` (``curvature_backward`` does nothing for the empirical Fisher, the default) and
records:

* the mini-batch loss of every step, and at evaluation points (every ``eval_every`` steps,
  and at step 0 and the last step) the mean loss on the **whole training set**, the test
  accuracy, and the training time so far (seconds of forward/backward/step only: the
  evaluations are not counted);
* the final training loss and test accuracy, the median milliseconds per step, the bytes of
  optimizer state (curvature blocks plus momentum or Adam buffers), and the steps and
  seconds to reach the task's target test accuracy (``None`` if never reached; checked at
  the evaluation points).

A method that raises while it is built or while it trains (a configuration it refuses, a
dtype it does not support, a numerical error) is recorded as ``"failed"`` with its error
message and the benchmark goes on; a run whose loss becomes non-finite stops and is
recorded as ``"diverged"``.

Tasks (:data:`TASKS`):

``digits-mlp``
    scikit-learn's 8×8 digits as 64-vectors (pixels/16; stratified 75/25 split,
    ``random_state=0``: 1347 training, 450 test images), MLP 64-128-10 with ReLU.
``digits-cnn``
    The same images as 1×8×8, Conv2d(1→16, k3, p1), ReLU, Conv2d(16→32, k3, p1), ReLU,
    AvgPool2d(2), Flatten, Linear(512→10).
``sequence``
    Synthetic per-token classification: 2048 training and 512 test sequences of 8 tokens
    with 16 Gaussian features; the labels (4 classes per token) are the argmax of a fixed
    random *teacher* network of the student's own shape, Linear(16→32), GELU, causal mean
    over the tokens so far, Linear(32→32), GELU, Linear(32→4), so the task is learnable
    exactly. Every Linear sees 3-D inputs ``(N, T, C)``; the loss is the cross-entropy mean
    over all ``N·T`` tokens (methods get ``loss_average="batch+sequence"``).

Hyperparameters: every registered method runs at its **recommended settings**
(:attr:`MethodSpec.recommended <curvkit.methods.MethodSpec.recommended>`, the defaults of
its optimizers, with per-task overrides under ``"tasks"``); SGD and AdamW take
:data:`HYPERPARAMETERS`; a method whose spec recommends nothing, e.g. one from a
third-party plugin that did not fill it, gets :data:`GENERIC_HYPERPARAMETERS`, from which
the options its configuration does not have are dropped. The methods run through their
named optimizer class when there is one (e.g. ``curvkit_kldwrm.QEKLDWRM``, whose inner
loop the generic :class:`~curvkit.optim.CurvatureOptimizer` lacks), otherwise through
:class:`~curvkit.optim.CurvatureOptimizer` with ``method=name``.

Use it from the command line (``curvkit bench --help``) or from Python::

    from curvkit.bench import run_bench, format_table
    results = run_bench(methods=["kfac", "singd"], tasks=["digits-mlp"], quick=True, out="bench-out")
    print(format_table(results))
"""

from curvkit.bench.report import format_table, plot_results
from curvkit.bench.runner import run_bench
from curvkit.bench.settings import (
    BASELINES,
    DEFAULT_OUT,
    DTYPES,
    GENERIC_HYPERPARAMETERS,
    HYPERPARAMETERS,
    JSON_NAME,
    OPTIMIZER_OPTIONS,
    hyperparameters_for,
)
from curvkit.bench.tasks import TASKS, Task

__all__ = [
    "BASELINES",
    "DEFAULT_OUT",
    "DTYPES",
    "GENERIC_HYPERPARAMETERS",
    "HYPERPARAMETERS",
    "JSON_NAME",
    "OPTIMIZER_OPTIONS",
    "TASKS",
    "Task",
    "format_table",
    "hyperparameters_for",
    "plot_results",
    "run_bench",
]

import os

import pytest
import torch

# Without a GPU, the Triton backend runs through Triton's interpreter on CPU
# tensors; the variable must be set before mhpo_kernels.triton_kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from util import DEVICE_AUDIT, device_for


@pytest.fixture
def no_launch(monkeypatch):
    """Any kernel launch fails the test: errors must come first."""
    from mhpo_kernels import backends

    class Trap:
        def fwd(self, *a, **k):
            raise AssertionError("kernel launched")
        bwd = fwd

    monkeypatch.setattr(backends, "get", lambda name: Trap())


@pytest.fixture(autouse=True)
def nan_poison():
    """Uninitialised memory is NaN (torch.empty* from Python and at::empty in the native
    kernels alike), so a kernel that leaves part of its output unwritten fails loudly."""
    prev = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
    torch.utils.deterministic.fill_uninitialized_memory = fill


# ---------------------------------------------------------------------------- device audit
# MHPO_TEST_DEVICE_AUDIT=1 (tests/test_devices.py runs the suite so) simulates a GPU
# machine on a CPU-only one: util.DEVICE and the GPU backends' device are 'meta', the
# native cpu backend's stays CPU. Only tests parametrized by a backend run, each up to
# its first call into the package, which must hand it tensors on device_for(backend)
# only: a test that builds its own CPU tensors (or uses DEVICE for the cpu backend)
# fails here, as it would on a real GPU machine.

AUDITED_PARAMS = ("backend", "path")  # path: a backend name or a backend-free path
ENTRY_POINTS = ("mhpo_loss", "policy_loss", "token_logprobs", "policy_loss_from_logprobs", "fused_linear_mhpo_loss")


class DeviceAuditStop(BaseException):  # not an Exception: pytest.raises(...) in a test lets it through
    def __init__(self, where, devices):
        super().__init__(where)
        self.where, self.devices = where, devices


def audited_backend(item):
    params = getattr(getattr(item, "callspec", None), "params", {})
    return next((params[k] for k in AUDITED_PARAMS if k in params), None)


def _devices(args, kwargs, extra=()):
    """The device types of the tensors in a call, the first tensor's first."""
    flat = list(args) + list(kwargs.values()) + list(extra)
    flat += [t for v in list(flat) if isinstance(v, (list, tuple)) for t in v]
    types = [t.device.type for t in flat if isinstance(t, torch.Tensor)]
    return types[:1] + sorted(set(types[1:]) - set(types[:1]))


def pytest_configure(config):
    config.addinivalue_line("markers", "wrong_device: the test hands the package a tensor on another device on "
                            "purpose (a bad-input test); the device audit checks its first tensor only")
    if DEVICE_AUDIT:  # boolean indexing of meta tensors in the tests (fake shapes are fine: nothing runs)
        import torch.fx.experimental._config as fx_config

        fx_config.meta_nonzero_assume_all_nonzero = True


def audit_keeps(item):
    slow = item.get_closest_marker("slow")
    return slow is None or slow.kwargs.get("audit", True)


def pytest_collection_modifyitems(config, items):
    if not DEVICE_AUDIT:
        return
    # slow tests stay (their slow part is the real work the audit stops before), except those marked
    # slow(audit=False), which build something big before their first call into the package
    skipped = [i for i in items if audited_backend(i) is None or not audit_keeps(i)]
    if skipped:
        config.hook.pytest_deselected(items=skipped)
        items[:] = [i for i in items if i not in skipped]


@pytest.fixture(autouse=True)
def device_audit(monkeypatch):
    """Under the audit, the package's entry points stop the test and report the devices they got."""
    if DEVICE_AUDIT:
        import mhpo_kernels as mk
        from mhpo_kernels import backends

        def stop(where):
            def entry(*args, **kwargs):
                raise DeviceAuditStop(where, _devices(args, kwargs))
            return entry

        for name in ENTRY_POINTS:
            monkeypatch.setattr(mk, name, stop(f"mk.{name}"))

        def module_forward(self, *args, **kwargs):
            raise DeviceAuditStop("MHPOLinearLoss", _devices(args, kwargs, self.parameters()))

        def resolve(backend, device):
            raise DeviceAuditStop(f"backends.resolve({backend!r})", [torch.device(device).type])

        monkeypatch.setattr(mk.MHPOLinearLoss, "forward", module_forward)
        monkeypatch.setattr(backends, "resolve", resolve)
        # tests of the registered ops call them through opcheck: its arguments are audited the same way
        monkeypatch.setattr(torch.library, "opcheck", stop("torch.library.opcheck"))
    yield


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem):
    if not DEVICE_AUDIT:
        return (yield)
    backend = audited_backend(pyfuncitem)
    want = device_for(backend).type
    try:
        yield
    except DeviceAuditStop as stop:
        checked = stop.devices[:1] if pyfuncitem.get_closest_marker("wrong_device") else stop.devices
        wrong = [d for d in checked if d != want]
        assert not wrong, (f"{stop.where} got tensors on {wrong} in a test of backend {backend!r}, which runs on "
                           f"{want} here: build them through the case builders (util.device_for)")
        return True
    raise AssertionError(f"the test of backend {backend!r} never called the package")


@pytest.fixture
def trl_head_calls(monkeypatch):
    """Counts the calls of TRL's fused-head function (``trl.trainer.utils._ChunkedLogProbFunction.apply``)."""
    import trl.trainer.utils as tU

    real, calls = tU._ChunkedLogProbFunction, []

    class Spy:
        @staticmethod
        def apply(*a):
            calls.append(a[6:])  # softcap, logit_scale, outputs
            return real.apply(*a)

    monkeypatch.setattr(tU, "_ChunkedLogProbFunction", Spy)
    return calls

"""Build onnxruntime sessions from deployment profiles, and the run loop that
goes with them (plain ``run`` on CPU, IO binding on GPU providers so inputs
and outputs do not bounce through host memory on every call).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from onnxforge.errors import DataError, ProviderError
from onnxforge.runtime.capture import Captured, first_reason, provider_log
from onnxforge.runtime.options import build_session_options
from onnxforge.runtime.profile import Profile, resolve_profile
from onnxforge.runtime.providers import profile_module


def _model_source(model) -> tuple[str | bytes, str | None]:
    """(what InferenceSession takes, the model's path if it has one)."""
    if isinstance(model, (str, os.PathLike)):
        return str(model), str(model)
    if isinstance(model, bytes):
        return model, None
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString(), None
    if hasattr(model, "to_proto"):  # onnxforge Model
        return model.to_proto().SerializeToString(), None
    raise ProviderError(f"session: expected a model path, ModelProto or onnxforge Model, got {type(model).__name__}")


def ort_providers(profile: Profile) -> list[tuple[str, dict[str, str]]]:
    return [profile_module(e.name).ort_provider(e.options) for e in profile.providers]


def session(model, profile="auto", *, strict: bool = True, provider: str = "cpu",
            overrides: Mapping | None = None) -> ort.InferenceSession:
    """An ``onnxruntime.InferenceSession`` for ``model`` built from a deployment profile.

    model: a path, ``onnx.ModelProto``, serialized bytes or onnxforge ``Model``.
    profile: ``"auto"`` (the ``model.profile.json`` beside a model path if there
        is one, else ``provider``'s defaults), ``None`` (``provider``'s
        defaults), a profile path, a dict or a ``Profile``.
    strict: refuse (``ProviderError``) when onnxruntime falls back from the
        profile's first provider instead of running somewhere else silently.
    overrides: session options applied over the profile's (e.g. threads).
    """
    src, path = _model_source(model)
    prof = resolve_profile(profile, path, provider)
    if overrides:
        prof = Profile(prof.providers, {**prof.session_options, **overrides}, prof.model, prof.tuning).validated()
    so = build_session_options(prof.session_options)
    providers = ort_providers(prof)
    primary = providers[0][0]
    # Only GPU providers fall back with nothing but a log line to say why.
    capture = provider_log() if primary != "CPUExecutionProvider" else contextlib.nullcontext(Captured())
    with capture as log:
        try:
            sess = ort.InferenceSession(src, sess_options=so, providers=providers)
        except Exception as exc:
            failure = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        else:
            failure = None
    if failure is not None:
        raise ProviderError(f"onnxruntime cannot create a session for {path or 'the model'}: {failure}",
                            hint="check the model with `onnxforge check`, and the profile's options")
    if strict and primary not in sess.get_providers():
        reason = first_reason(log.text) or "no reason logged"
        raise ProviderError(f"the profile asks for {primary} but onnxruntime fell back to "
                            f"{', '.join(sess.get_providers())}: {reason}")
    return sess


def uses_io_binding(profile: Profile, sess: ort.InferenceSession) -> bool:
    entry = profile.providers[0]
    return entry.name != "cpu" and bool(entry.options.get("io_binding")) and \
        profile_module(entry.name).ORT_NAME in sess.get_providers()


def make_runner(sess: ort.InferenceSession, feeds: Sequence[dict], profile: Profile | None = None
                ) -> Callable[[int], object]:
    """``run(i)`` runs the session on ``feeds[i % len(feeds)]``.

    With IO binding (GPU profiles) every feed is copied to the device once and
    outputs stay there: the timed call is the model, not PCIe transfers.
    """
    names = {i.name for i in sess.get_inputs()}
    missing = sorted(names - set(feeds[0])) if feeds else sorted(names)
    if missing:
        raise DataError(f"the feeds lack model input(s) {', '.join(missing)}; they hold {', '.join(feeds[0]) if feeds else 'nothing'}")
    feeds = [{k: v for k, v in feed.items() if k in names} for feed in feeds]
    if profile is not None and uses_io_binding(profile, sess):
        return io_binding_runner(sess, feeds, "cuda", profile.providers[0].options.get("device_id", 0))
    count = len(feeds)
    return lambda i: sess.run(None, feeds[i % count])


def io_binding_runner(sess, feeds, device: str, device_id: int = 0):
    """``run(i)`` with every feed copied once to ``device`` and outputs kept there."""
    bindings = []
    for feed in feeds:
        binding = sess.io_binding()
        for name, array in feed.items():
            # np.asarray(order="C") keeps a scalar 0-d: ascontiguousarray makes it [1],
            # which a model input declared as a scalar refuses.
            value = ort.OrtValue.ortvalue_from_numpy(np.asarray(array, order="C"), device, device_id)
            binding.bind_ortvalue_input(name, value)
        for out in sess.get_outputs():
            binding.bind_output(out.name, device, device_id)
        sess.run_with_iobinding(binding)
        # Rebind the outputs to the buffers just allocated: fixed addresses are
        # what CUDA graph replay needs, and it saves an allocation per run.
        for out, value in zip(sess.get_outputs(), binding.get_outputs()):
            binding.bind_ortvalue_output(out.name, value)
        bindings.append(binding)
    count = len(bindings)

    def run(i: int):
        binding = bindings[i % count]
        sess.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return binding

    return run


def outputs_as_numpy(result) -> list[np.ndarray]:
    """Outputs of a runner call as host arrays (copies them back under IO binding)."""
    if isinstance(result, list):
        return result
    return result.copy_outputs_to_cpu()


def model_path_of(model) -> Path | None:
    return Path(model) if isinstance(model, (str, os.PathLike)) else None

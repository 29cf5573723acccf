"""Loading a Piper voice: only the graph the job needs, optimised once per machine.

Two graphs can come from one ``.onnx`` file. Speech needs the plain one. Renders need
phoneme alignments, which Piper gets by patching the graph in memory with the ``onnx``
package (+0.2-0.4 s and ~100 MB more than the plain load), so only renders ask for it.

onnxruntime spends most of a session's start-up optimising the graph (fusing, constant
folding, layout changes) — the same work every process, for the same file. On the CPU we
let it save the optimised graph (``optimized_model_filepath``) into ``broker.engines.cache``
and later load that with optimisation off, which starts in less than half the time. The
optimised graph may use this CPU's instructions, so the key names the CPU, the runtime's
version and the model file (path, size, modification time), and the alignments patch is
saved with it: a later render loads it without importing ``onnx`` at all. The graph is the
same computation; Piper's noise is random per process either way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

from broker.engines import cache
from broker.engines.heap import release_free_heap
from broker.errors import EngineUnavailable

log = logging.getLogger(__name__)

_KIND = "onnx"
#: bump when what is saved changes (the patch, the optimisation level)
_VERSION = 1


def load_voice(model_path: Path, *, alignments: bool, use_cuda: bool) -> Any:
    """A ``piper.PiperVoice`` for ``model_path``; ``alignments`` patches in the phoneme-duration output."""
    from piper import PiperVoice
    from piper.config import PiperConfig

    if not model_path.is_file():
        raise EngineUnavailable(f"Piper voice not found at {model_path}")
    started = time.perf_counter()
    try:
        if use_cuda:  # graphs optimised for CUDA are tied to its provider: let Piper load as it does
            voice = PiperVoice.load(model_path, use_cuda=True, include_alignments=alignments)
        else:
            with open(f"{model_path}.json", encoding="utf-8") as f:
                config = PiperConfig.from_dict(json.load(f))
            voice = PiperVoice(config=config, session=_cpu_session(model_path, alignments))
    except EngineUnavailable:
        raise
    except Exception as exc:
        raise EngineUnavailable(f"could not load Piper voice {model_path.name}: {exc}") from None
    release_free_heap()  # the parsed model, copied into tensors and freed
    log.debug("loaded %s%s in %.0f ms", model_path.name, " with alignments" if alignments else "",
              1000 * (time.perf_counter() - started))
    return voice


def _cpu_session(model_path: Path, alignments: bool) -> Any:
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    saved = _saved_path(model_path, alignments, ort.__version__)
    if saved is not None and saved.is_file():
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            return ort.InferenceSession(str(saved), sess_options=options, providers=providers)
        except Exception as exc:  # truncated or corrupt: optimise again and replace it
            log.warning("ignoring unreadable optimised graph %s (%s)", saved, exc)
    model: str | bytes = str(model_path)
    if alignments:
        model = _patched(model_path)
        if isinstance(model, str):
            saved = None  # not patched (no onnx package): do not store it as the aligned graph
    options = ort.SessionOptions()
    if saved is None:
        return ort.InferenceSession(model, sess_options=options, providers=providers)
    try:
        with cache.atomic_path(saved) as tmp:
            options.optimized_model_filepath = str(tmp)
            # it warns that the saved graph may hold this CPU's instructions: the key already says which CPU
            options.log_severity_level = 3
            session = ort.InferenceSession(model, sess_options=options, providers=providers)
    except OSError as exc:  # cannot write the cache: the session is fine without it
        log.warning("could not save the optimised graph to %s: %s", saved, exc)
        options = ort.SessionOptions()
        session = ort.InferenceSession(model, sess_options=options, providers=providers)
    return session


def _patched(model_path: Path) -> bytes | str:
    """The model with its phoneme-duration tensor marked as an output (needs the ``onnx`` package)."""
    try:
        import onnx
        from piper.patch_voice_with_alignment import add_alignment_output
    except ImportError:
        log.warning("the onnx package is missing: renders fall back to loudness for the mouth")
        return str(model_path)
    model = onnx.load(str(model_path))
    try:
        add_alignment_output(model)
    except ValueError:  # already patched, or no duration tensor to expose: use it as it is
        return str(model_path)
    return bytes(model.SerializeToString())


def _saved_path(model_path: Path, alignments: bool, runtime: str) -> Path | None:
    try:
        st = model_path.stat()
    except OSError:
        return None
    entry = cache.key(_KIND, _VERSION, str(model_path.resolve()), st.st_size, st.st_mtime_ns, alignments, runtime,
                      _cpu_fingerprint())
    return cache.path_for(_KIND, entry, ".onnx")


@lru_cache(maxsize=1)
def _cpu_fingerprint() -> str:
    """This CPU's model and instruction-set flags (what an optimised graph may depend on)."""
    lines: list[str] = []
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU implementer", "CPU part")):
                    lines.append(line.strip())
                elif not line.strip() and lines:
                    break  # the first processor describes them all
    except OSError:
        pass
    text = "\n".join([platform.machine(), platform.processor(), *lines])
    return hashlib.sha256(text.encode()).hexdigest()[:16]

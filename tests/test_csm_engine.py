"""The CSM engine on a tiny randomly initialised checkpoint, loaded the way real weights are.

The fixture writes a complete transformers folder (config, safetensors weights,
tokenizer, feature extractor, chat template) to a temp dir, offline; the engine then
loads it through ``engines.configure``/``LocalProvider``/``CloudGPUManager`` like a
real csm-1b folder. Random weights make noise, so we assert shape, rate, length,
finiteness and plumbing (context reaches the model, cancellation, errors), not quality.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from broker import engines
from broker.errors import EngineUnavailable, InvalidRequest, JobCancelled
from broker.media import SAMPLE_RATE, Audio
from broker.settings import EngineSettings, Settings
from broker.types import Segment, SpeechRequest, build

pytest.importorskip("torch")
pytest.importorskip("transformers")

FRAME = SAMPLE_RATE * 80 // 1000  # one 80 ms Mimi frame at 24 kHz
CODEBOOKS = 4
CODES = 32
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|AUDIO|>", "<|audio_eos|>"]
# The conversation format of sesame/csm-1b's template: <bos>[speaker]text<eos>, then the turn's audio if any.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ bos_token }}[{{ message['role'] }}]"
    "{%- for item in message['content'] if item['type'] == 'text' -%}{{ item['text'] }}{%- endfor -%}"
    "{{ eos_token }}"
    "{%- for item in message['content'] if item['type'] == 'audio' -%}<|AUDIO|><|audio_eos|>{%- endfor -%}"
    "{%- endfor -%}"
)


def build_tiny_csm(folder: Path, *, mute: bool = False) -> Path:
    """A few-layer CSM (backbone, depth decoder, Mimi) with a byte-level tokenizer, saved like a real checkpoint.

    ``mute``: zero output heads, so greedy decoding picks code 0 everywhere: "end of speech" at the first frame.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        CsmConfig,
        CsmDepthDecoderConfig,
        CsmForConditionalGeneration,
        CsmProcessor,
        EncodecFeatureExtractor,
        MimiConfig,
        PreTrainedTokenizerFast,
    )

    # Every byte is a token (no merges), so any text tokenizes; specials first so their ids are 0..3.
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=SPECIALS[0], eos_token=SPECIALS[1], pad_token=SPECIALS[1],
        additional_special_tokens=SPECIALS[2:],
    )
    # Mimi keeps its real strides (1920 samples a frame, 12.5 Hz: the processor assumes them) but is a few
    # hundred weights wide. Its codebook covers CSM's whole code range so any sampled code decodes.
    codec = MimiConfig(
        hidden_size=16, num_filters=2, codebook_size=CODES, codebook_dim=8, num_quantizers=CODEBOOKS,
        vector_quantization_hidden_dimension=8, upsample_groups=16, num_hidden_layers=1, intermediate_size=32,
        num_attention_heads=2, num_key_value_heads=2, sliding_window=16, max_position_embeddings=512,
    )
    # Wide initial weights (0.5, not 0.02) so a model this small still reacts to what it is given.
    depth = CsmDepthDecoderConfig(
        num_codebooks=CODEBOOKS, backbone_hidden_size=32, vocab_size=CODES, hidden_size=16, intermediate_size=32,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=CODEBOOKS + 1,
        initializer_range=0.5,
    )
    config = CsmConfig(
        num_codebooks=CODEBOOKS, vocab_size=CODES, text_vocab_size=len(vocab), hidden_size=32,
        intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=512, initializer_range=0.5,
        bos_token_id=0, pad_token_id=2, audio_token_id=2, audio_eos_token_id=3,
        codebook_pad_token_id=CODES - 1, codebook_eos_token_id=0,
        depth_decoder_config=depth, codec_config=codec,
    )
    torch.manual_seed(0)
    model = CsmForConditionalGeneration(config)
    # Mimi's codebooks start as zeros (a trained codec fills them); random centroids make codes mean something.
    for name, buffer in model.named_buffers():
        if name.endswith("codebook.embed_sum"):
            buffer.copy_(torch.randn_like(buffer))
    if mute:
        with torch.no_grad():
            model.lm_head.weight.zero_()
            model.depth_decoder.codebooks_head.weight.zero_()
    model.save_pretrained(folder)
    extractor = EncodecFeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0)
    CsmProcessor(feature_extractor=extractor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """A model this small gains nothing from threads, and on a busy 2-core machine they spin against each other."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_csm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_csm(tmp_path_factory.mktemp("tiny-csm"))


@pytest.fixture
def csm(tiny_csm: Path):
    engines.configure(EngineSettings(default="csm", csm_path=str(tiny_csm)), device="cpu")
    yield tiny_csm
    engines.configure()


def _voice(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * 180 * t) + 0.02 * rng.standard_normal(len(t))).astype(np.float32)


def _well_formed(audio: Audio, max_ms: float) -> None:
    assert isinstance(audio, Audio) and audio.sample_rate == SAMPLE_RATE
    assert audio.samples.ndim == 1 and audio.samples.dtype == np.float32
    assert 0 < len(audio) <= max_ms * SAMPLE_RATE / 1000
    assert len(audio) % FRAME == 0, "whole 80 ms frames"
    assert audio.is_finite()


def test_synthesize_by_name_through_the_engine_registry(csm: Path) -> None:
    from broker.engines.csm_engine import CSMEngine

    engine = engines.speech_engine("csm")
    assert isinstance(engine, CSMEngine) and engine.name == "csm" and "csm" in engines.SPEECH_ENGINES
    assert engine.speakers() == [str(i) for i in range(10)]
    audio = engines.synthesize(SpeechRequest(text="Hello there.", max_length_ms=800))
    _well_formed(audio, 800)
    # a speaker given by name is the same id
    assert len(engines.synthesize(SpeechRequest(text="Hi.", speaker="3", max_length_ms=400, engine="csm"))) > 0


def test_context_turns_reach_the_model(csm: Path) -> None:
    context = [Segment(speaker=0, text="How are you?", audio=_voice(0.5)),
               Segment(speaker=1, text="Fine, thanks.", audio=Audio(_voice(0.3, seed=1)))]
    greedy = {"text": "And you?", "max_length_ms": 800, "temperature": 0.0}
    with_context = engines.synthesize(SpeechRequest(**greedy, context=context))
    _well_formed(with_context, 800)
    again = engines.synthesize(SpeechRequest(**greedy, context=context))
    without = engines.synthesize(SpeechRequest(**greedy))
    assert np.array_equal(with_context.samples, again.samples), "greedy decoding is deterministic"
    assert not np.array_equal(with_context.samples, without.samples), "the context changed what was generated"


def test_context_at_the_wrong_rate_is_rejected_by_the_types() -> None:
    with pytest.raises(InvalidRequest, match="16000 Hz"):
        Segment(speaker=0, text="hi", audio=_voice(0.5), sample_rate=16_000)


def test_bad_requests_are_rejected_before_generating(csm: Path) -> None:
    with pytest.raises(InvalidRequest) as info:
        engines.synthesize(SpeechRequest(text="Hi.", speaker=10))
    assert info.value.field == "speaker"
    with pytest.raises(InvalidRequest) as info:
        engines.synthesize(SpeechRequest(text="Hi.", context=[Segment(speaker=12, text="x", audio=_voice(0.2))]))
    assert info.value.field == "context[0].speaker"
    with pytest.raises(InvalidRequest) as info:
        engines.synthesize(SpeechRequest(text="Hi.", max_length_ms=50))
    assert info.value.field == "max_length_ms"
    # the tiny model has 512 positions: 40 s of context is 500 frames, leaving too few to say anything
    long_context = [Segment(speaker=0, text="x", audio=_voice(40.0))]
    with pytest.raises(InvalidRequest) as info:
        engines.synthesize(SpeechRequest(text="Hi.", context=long_context))
    assert info.value.field == "context"


def test_stream_is_sentence_by_sentence_within_the_length_caps(csm: Path) -> None:
    request = SpeechRequest(text="A. B! C? D.", max_length_ms=6000)
    pieces = list(engines.synthesize_stream(request))
    # Random weights never say "end of speech", so each sentence runs to its own cap (a generous speaking
    # time for its text: 1.76 s for these); the fourth gets what is left of the 6 s (0.72 s).
    engine = engines.speech_engine("csm")
    cap = engine._frames_for("A.") * FRAME  # type: ignore[attr-defined]
    assert [len(p) for p in pieces] == [cap, cap, cap, 6 * SAMPLE_RATE - 3 * cap]
    for piece in pieces:
        _well_formed(piece, 6000)


def test_text_is_cut_into_sentences_and_bounded_pieces() -> None:
    from broker.engines.csm_engine import _pieces

    assert _pieces("A b. C d!\nE f?  G") == ["A b.", "C d!", "E f?", "G"]
    long = ("word " * 200).strip() + "."
    assert all(len(p) <= 300 for p in _pieces(long)) and " ".join(_pieces(long)) == long
    assert _pieces("First part, " + "x " * 200 + "end.")[0] == "First part,"


def test_cancel_between_sentences_and_inside_a_sentence(csm: Path) -> None:
    cancel = threading.Event()
    stream = engines.synthesize_stream(SpeechRequest(text="A. B.", max_length_ms=8000), cancel)
    first = next(stream)
    assert len(first) > 0
    cancel.set()
    with pytest.raises(JobCancelled):
        next(stream)

    class CancelAfter(threading.Event):
        """Reads as set after a few looks: the first look is before the sentence, the rest inside generate."""

        def __init__(self, looks: int) -> None:
            super().__init__()
            self.looks = looks

        def is_set(self) -> bool:
            self.looks -= 1
            return self.looks < 0

    with pytest.raises(JobCancelled):
        engines.synthesize(SpeechRequest(text="One long sentence.", max_length_ms=4000), CancelAfter(3))


def test_end_of_speech_at_the_first_frame_gives_empty_audio(tmp_path: Path) -> None:
    from broker.engines.csm_engine import CSMEngine

    engine = CSMEngine(build_tiny_csm(tmp_path, mute=True), device="cpu")
    request = SpeechRequest(text="Nothing to say. Still nothing.", max_length_ms=2000, temperature=0.0)
    assert list(engine.stream(request)) == []
    audio = engine.synthesize(request)
    assert len(audio) == 0 and audio.sample_rate == SAMPLE_RATE


def test_bfloat16_weights_give_float32_audio(tiny_csm: Path) -> None:
    from broker.engines.csm_engine import CSMEngine

    engine = CSMEngine(tiny_csm, device="cpu", dtype="bfloat16")
    audio = engine.synthesize(SpeechRequest(text="Hi.", max_length_ms=400,
                                            context=[Segment(speaker=1, text="Yo.", audio=_voice(0.3))]))
    _well_formed(audio, 400)


def test_missing_or_wrong_folder_is_engine_unavailable(tmp_path: Path) -> None:
    from broker.engines.csm_engine import CSMEngine

    with pytest.raises(EngineUnavailable, match="does not exist"):
        CSMEngine(tmp_path / "nowhere").load()
    with pytest.raises(EngineUnavailable, match=r"no config\.json"):
        CSMEngine(tmp_path).load()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(EngineUnavailable, match="not 'csm'"):
        CSMEngine(tmp_path).load()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "csm"}))
    with pytest.raises(EngineUnavailable, match="could not load"):
        CSMEngine(tmp_path).load()
    try:
        engines.configure(EngineSettings(default="csm", csm_path=str(tmp_path / "nowhere")), device="cpu")
        with pytest.raises(EngineUnavailable):
            engines.synthesize(SpeechRequest(text="Hi."))
        engines.configure(EngineSettings(default="csm"), device="cpu")
        with pytest.raises(EngineUnavailable, match="csm_path"):
            engines.synthesize(SpeechRequest(text="Hi."))
    finally:
        engines.configure()


@pytest.fixture
def csm_settings(tiny_csm: Path):
    settings = Settings(engines=EngineSettings(default="csm", csm_path=str(tiny_csm)))
    settings.local.device = "cpu"
    yield settings
    engines.configure()


def test_loads_from_the_folder_only_and_leaves_offline_mode_as_it_was(
    tiny_csm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants as hub_constants

    from broker.engines.csm_engine import CSMEngine

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    before = hub_constants.HF_HUB_OFFLINE
    CSMEngine(tiny_csm).load()
    after = hub_constants.HF_HUB_OFFLINE
    assert "HF_HUB_OFFLINE" not in os.environ and after == before
    # weights without the processor files: an error naming the processor, no attempt to fetch it elsewhere
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(tiny_csm / name, tmp_path / name)
    with pytest.raises(EngineUnavailable, match="processor"):
        CSMEngine(tmp_path).load()


async def test_local_provider_runs_csm(csm_settings: Settings) -> None:
    from broker.providers.local import LocalProvider

    provider = LocalProvider.from_settings(csm_settings)
    job = await provider.submit(build(SpeechRequest, text="Hello.", max_length_ms=600))
    _well_formed(await job.result(timeout=120), 600)
    chunks = [c async for c in provider.astream_speech("A. B.", max_length_ms=2200)]
    assert [c.index for c in chunks] == [0, 1, 2] and chunks[-1].is_end  # two sentences, then the end marker
    assert (await provider.health()).ok


def test_manager_routes_to_local_csm(csm_settings: Settings) -> None:
    from broker.routing.manager import CloudGPUManager

    manager = CloudGPUManager(["local"], settings=csm_settings)
    audio = manager.generate_speech("Hi.", speaker=1, max_length_ms=400, return_tensor=False)
    _well_formed(audio, 400)
    assert manager.last_report is not None and manager.last_report.provider == "local"

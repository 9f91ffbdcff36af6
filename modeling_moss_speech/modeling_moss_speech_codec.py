"""The MOSS-Speech codec as one transformers model: speech tokenizer + flow-matching decoder + HiFT + CAM++.

`MossSpeechCodecModel.encode` turns audio (any rate, mono or multi-channel) into 12.5 Hz codes;
`decode` turns codes back into 24 kHz speech, batched, optionally in the voice of a `MossSpeechVoicePrompt`;
`stream_decode` yields speech chunks while codes arrive. State-dict prefixes follow the release's files:
`encoder.*` (the codec's model.safetensors), `flow.*` (flow/flow.pt), `hift.*` (flow/hift.pt) and
`speaker_encoder.*` (flow/campplus.onnx, converted).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torchaudio
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.models.whisper.modeling_whisper import sinusoids
from transformers.utils import ModelOutput, logging

from .configuration_moss_speech_codec import MossSpeechCodecConfig
from .feature_extraction_moss_speech import MossSpeechFeatureExtractor, prepare_waveforms
from .loading import checked_from_pretrained
from .modeling_moss_speech_codec_encoder import MAX_BATCH_SECONDS, MossSpeechCodecEncoder, encode_waveforms
from .modeling_moss_speech_codec_flow import MossSpeechCodecFlow, MossSpeechCodecFlowCFM
from .modeling_moss_speech_codec_griffin_lim import MossSpeechCodecGriffinLim
from .modeling_moss_speech_codec_speaker import MossSpeechCodecSpeakerEncoder
from .modeling_moss_speech_codec_stream import MossSpeechFlowStream, MossSpeechVocoderStream
from .modeling_moss_speech_codec_vocoder import MossSpeechCodecVocoder, MossSpeechCodecVocoderSnake

logger = logging.get_logger(__name__)


def prompt_mel_hop_length(sampling_rate: int = 24000) -> int:
    """Samples per frame of `prompt_mel_spectrogram` (20 ms); a prompt of `n` samples has `n // hop` frames."""
    return sampling_rate // 50


def prompt_mel_spectrogram(waveform_24k: torch.Tensor, n_mels: int = 80, sampling_rate: int = 24000) -> torch.Tensor:
    """Log-mel of a 24 kHz voice prompt as the flow was trained on: (frames, n_mels).

    n_fft = window = 1920, hop 480, Hann, no centering (reflect-pad (n_fft - hop) / 2 each side), magnitude,
    slaney mel filters over 0-8 kHz, natural log clamped at 1e-5 (the Matcha-TTS / HiFi-GAN recipe).
    """
    hop = prompt_mel_hop_length(sampling_rate)
    n_fft = 4 * hop
    wav = waveform_24k.float().reshape(1, 1, -1)
    pad = (n_fft - hop) // 2
    wav = torch.nn.functional.pad(wav, (pad, pad), mode="reflect").reshape(1, -1)
    spec = torch.stft(wav, n_fft, hop_length=hop, win_length=n_fft, window=torch.hann_window(n_fft, device=wav.device),
                      center=False, return_complex=True)
    magnitude = torch.sqrt(spec.real.pow(2) + spec.imag.pow(2) + 1e-9)
    filters = torchaudio.functional.melscale_fbanks(n_fft // 2 + 1, 0.0, 8000.0, n_mels, sampling_rate,
                                                    norm="slaney", mel_scale="slaney").to(wav.device)
    mel = torch.matmul(filters.T, magnitude[0])
    return torch.log(torch.clamp(mel, min=1e-5)).T.contiguous()


@dataclass
class MossSpeechVoicePrompt:
    """A voice to speak in: the prompt's codes, its 24 kHz log-mel (4 frames per code) and its CAM++ x-vector.

    Build one with `codec.voice_prompt(wav, sampling_rate)`, reuse it across decodes, ship it with `save(path)`.
    """

    tokens: torch.LongTensor
    mel: torch.FloatTensor
    speaker_embedding: torch.FloatTensor
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("tokens", "mel", "speaker_embedding"):
            if not isinstance(getattr(self, name), torch.Tensor):
                raise TypeError(f"voice prompt {name} must be a tensor, got {type(getattr(self, name)).__name__}.")
        if self.tokens.ndim != 1:
            raise ValueError(f"voice prompt tokens must be 1-D, got shape {tuple(self.tokens.shape)}.")
        if self.tokens.is_floating_point() or self.tokens.is_complex() or self.tokens.dtype == torch.bool:
            raise TypeError(f"voice prompt tokens must be integer codes, got dtype {self.tokens.dtype}.")
        if self.mel.ndim != 2:
            raise ValueError(f"voice prompt mel must be (frames, mel_bins), got shape {tuple(self.mel.shape)}.")
        if self.speaker_embedding.ndim != 1:
            raise ValueError(
                f"voice prompt speaker_embedding must be 1-D, got shape {tuple(self.speaker_embedding.shape)}."
            )
        for name in ("mel", "speaker_embedding"):
            if not getattr(self, name).is_floating_point():
                raise TypeError(f"voice prompt {name} must be a float tensor, got dtype {getattr(self, name).dtype}.")

    def save(self, path: str) -> None:
        """Write the prompt as a `.safetensors` file (three tensors plus string metadata)."""
        tensors = {"tokens": self.tokens.cpu().contiguous(), "mel": self.mel.float().cpu().contiguous(),
                   "speaker_embedding": self.speaker_embedding.float().cpu().contiguous()}
        save_file(tensors, path, metadata={"format": "moss_speech_voice_prompt",
                                           **{k: str(v) for k, v in self.metadata.items()}})

    @classmethod
    def load(cls, path: str | os.PathLike) -> MossSpeechVoicePrompt:
        """Read a prompt written by `save`.

        Raises `FileNotFoundError` when `path` does not exist and `ValueError` naming the file when it is not a
        safetensors file or not a voice prompt. Whether the prompt fits a codec is checked where it is used.
        """
        from safetensors import SafetensorError, safe_open

        path = str(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"voice prompt file {path!r} does not exist.")
        try:
            with safe_open(path, framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
            tensors = load_file(path)
        except (SafetensorError, OSError, ValueError) as error:
            raise ValueError(f"{path!r} is not a MOSS-Speech voice prompt file: not readable as safetensors "
                             f"({error}); write one with MossSpeechVoicePrompt.save.") from error
        if metadata.pop("format", None) != "moss_speech_voice_prompt":
            raise ValueError(f"{path!r} is not a MOSS-Speech voice prompt file (missing format metadata).")
        missing = [name for name in ("tokens", "mel", "speaker_embedding") if name not in tensors]
        if missing:
            raise ValueError(f"voice prompt file {path!r} lacks the tensors {missing} (it has {sorted(tensors)}).")
        try:
            return cls(tensors["tokens"], tensors["mel"], tensors["speaker_embedding"], metadata)
        except (TypeError, ValueError) as error:
            raise ValueError(f"voice prompt file {path!r}: {error}") from error


@dataclass
class MossSpeechCodecEncodeOutput(ModelOutput):
    """Result of [`MossSpeechCodecModel.encode`]: one 1-D code tensor per utterance and their lengths."""

    codes: list[torch.LongTensor] | None = None
    lengths: torch.LongTensor | None = None


@dataclass
class MossSpeechCodecDecodeOutput(ModelOutput):
    """Result of [`MossSpeechCodecModel.decode`]: right-padded float32 waveforms (B, N) at `sampling_rate`."""

    waveforms: torch.FloatTensor | None = None
    lengths: torch.LongTensor | None = None
    sampling_rate: int | None = None


# torch layers whose `reset_parameters` is their constructor's initialisation.
_TORCH_LAYERS = (
    torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.ConvTranspose1d, torch.nn.LayerNorm,
    torch.nn.GroupNorm, torch.nn.Embedding,
)


class MossSpeechCodecPreTrainedModel(PreTrainedModel):
    """Loading glue of the codec; float32 by default whatever dtype the LM uses."""

    config: MossSpeechCodecConfig
    config_class = MossSpeechCodecConfig
    base_model_prefix = "codec"
    main_input_name = "input_features"
    # Each component reads its own weights' device and dtype and is entered through methods other than `forward`
    # (flow.inference, speaker_encoder.embed, encode_waveforms), so a device_map must keep each one whole.
    _no_split_modules: list[str] = [
        "MossSpeechCodecEncoder", "MossSpeechCodecFlow", "MossSpeechCodecVocoder", "MossSpeechCodecSpeakerEncoder",
    ]
    _components = ("encoder", "flow", "hift", "speaker_encoder")
    supports_gradient_checkpointing = False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, float32 unless `dtype` is given, components whole on one device each.

        transformers' default `dtype="auto"` follows the checkpoint's `config.json` (a codec saved from a bf16
        pipeline would come back in bf16); the codec stays float32 unless `dtype` (or `torch_dtype`) is passed.
        A `device_map` may name `""` or whole components (`encoder`, `flow`, `hift`, `speaker_encoder`) on devices;
        offloading (`"disk"`, or `"cpu"` next to accelerators) is refused: the codec runs its components through
        methods that accelerate's offload hooks do not cover. Loading is checked as for the language model: a missing
        or unexpected tensor is a `CheckpointError` naming the keys unless `strict=False`, a corrupt safetensors file
        is one naming the file, and pickled weights are never opened (convert the release's with
        `moss-speech convert --codec`).
        """
        if kwargs.get("dtype") is None and kwargs.get("torch_dtype") is None:
            kwargs["dtype"] = torch.float32
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict):
            for key in device_map:
                if key != "" and key not in cls._components:
                    raise ValueError(
                        f"device_map entry {key!r} is not a codec component: name '' or whole components "
                        f"{list(cls._components)} (each runs on one device)."
                    )
            cls._check_no_offload(device_map.values())
        loaded = checked_from_pretrained(super().from_pretrained, cls, pretrained_model_name_or_path, model_args,
                                         kwargs, "codec")
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, info) with output_loading_info=True
        cls._check_no_offload(getattr(model, "hf_device_map", {}).values())
        return loaded

    @staticmethod
    def _check_no_offload(devices) -> None:
        devices = {str(d) for d in devices}
        if "disk" in devices or ("cpu" in devices and len(devices) > 1):
            raise ValueError(
                f"The codec cannot be offloaded (device_map devices {sorted(devices)}): put each component on one "
                "device, e.g. device_map={'': 0} or 'cpu', or give max_memory enough room for whole components."
            )

    def _init_weights(self, module: torch.nn.Module) -> None:
        """What each component's constructor does, redone on a materialised model (meta-device construction, then
        `to_empty()` and `init_weights()`, the path FSDP2's memory-efficient loading takes).

        Not transformers' generic init: it would draw normal weights where the release uses torch's defaults, break
        weight-norm parametrizations and overwrite the frozen sinusoid tables. Everything goes through
        `transformers.initialization` (or torch's init functions, which transformers guards while it initialises),
        so tensors a checkpoint provided are left alone.
        """
        weight_norm = getattr(getattr(module, "parametrizations", None), "weight", None)
        if isinstance(module, MossSpeechCodecFlowCFM):
            # Not a checkpoint tensor: the flow's fixed noise, drawn again from its seed.
            module.reset_noise()
        elif weight_norm is not None:
            # weight_norm(conv): torch's default conv init of the direction, magnitude = its norm (as at construction).
            direction, magnitude = weight_norm.original1, weight_norm.original0
            init.kaiming_uniform_(direction, a=math.sqrt(5))
            norm = torch.linalg.vector_norm(direction, dim=tuple(range(1, direction.ndim)), keepdim=True)
            init.copy_(magnitude, norm)
            if getattr(module, "bias", None) is not None:
                fan_in = direction.shape[1] * math.prod(direction.shape[2:])
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            super()._init_weights(module)  # unit/zero affine, zero mean / unit variance running statistics
        elif isinstance(module, torch.nn.Embedding) and not module.weight.requires_grad:
            # The encoder's frozen sinusoidal position tables.
            init.copy_(module.weight, sinusoids(*module.weight.shape).to(module.weight))
        elif isinstance(module, _TORCH_LAYERS):
            module.reset_parameters()  # torch's constructor init, also for subclasses (the flow's causal convs)
        elif isinstance(module, MossSpeechCodecVocoderSnake):
            init.ones_(module.alpha)
        elif hasattr(module, "pos_bias_u"):
            init.xavier_uniform_(module.pos_bias_u)
            init.xavier_uniform_(module.pos_bias_v)
        elif isinstance(module, MossSpeechCodecSpeakerEncoder):
            module.reset_parameters()  # Kaiming-normal convolutions, after their default init (children first)


class MossSpeechCodecModel(MossSpeechCodecPreTrainedModel):
    """Speech tokenizer and speech decoder of MOSS-Speech.

    Example:

    ```python
    >>> codec = AutoModel.from_pretrained("path/to/codec")          # float32
    >>> codes = codec.encode(waveform, sampling_rate=44100).codes      # list of 1-D LongTensors, 12.5 per second
    >>> speech = codec.decode(codes, voice_prompt=codec.voice_prompt(prompt_wav, 16000))
    >>> speech.waveforms.shape, speech.sampling_rate                   # (B, 1920 x codes), 24000
    ```
    """

    def __init__(self, config: MossSpeechCodecConfig) -> None:
        super().__init__(config)
        self.encoder = MossSpeechCodecEncoder(config.encoder_config)
        self.flow = MossSpeechCodecFlow(config.flow_config)
        # `hift` / `speaker_encoder` are None when the config asks for neither (no state-dict keys then).
        if config.vocoder_type == "hift":
            self.hift = MossSpeechCodecVocoder(config.vocoder_config)
        else:
            self.hift = None
            self.griffin_lim = MossSpeechCodecGriffinLim(config.vocoder_config, n_iter=config.griffin_lim_iters)
        self.speaker_encoder = (
            None if config.speaker_config is None else MossSpeechCodecSpeakerEncoder(config.speaker_config)
        )
        self.feature_extractor = MossSpeechFeatureExtractor(
            feature_size=config.encoder_config.num_mel_bins, sampling_rate=config.sampling_rate
        )
        self.post_init()

    @property
    def output_sampling_rate(self) -> int:
        return self.config.output_sampling_rate

    @property
    def vocoder(self) -> torch.nn.Module:
        """The mel → waveform module `config.vocoder_type` names: HiFT (`hift`) or Griffin-Lim (`griffin_lim`)."""
        return self.hift if self.hift is not None else self.griffin_lim

    def forward(self, input_features: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """Tokenize log-mel features (from `MossSpeechFeatureExtractor`): codes and their mask."""
        return self.encoder(input_features, attention_mask)

    # ------------------------------------------------------------------ encode
    @torch.no_grad()
    def encode(
        self, audio, sampling_rate: int | None = None, batch_size: int = 32,
        max_batch_seconds: float = MAX_BATCH_SECONDS,
    ) -> MossSpeechCodecEncodeOutput:
        """Codes of one waveform or a list: ceil(seconds × 12.5) codes each, long audio in 30 s chunks.

        `audio`: numpy array or tensor, (samples,) or (channels, samples), float in [-1, 1] (beyond is clipped, with
        a warning); or a list of them (batched). Each encoder call takes at most `batch_size` chunks and
        `max_batch_seconds` of audio, so peak memory stays bounded for hours of audio (see `encode_waveforms`).
        """
        codes = encode_waveforms(self.encoder, self.feature_extractor, audio, sampling_rate, batch_size=batch_size,
                                 max_batch_seconds=max_batch_seconds)
        lengths = torch.tensor([c.numel() for c in codes], dtype=torch.long)
        return MossSpeechCodecEncodeOutput(codes=codes, lengths=lengths)

    # ------------------------------------------------------------- recognition
    @property
    def can_transcribe(self) -> bool:
        """Whether this codec carries a CTC recogniser (nano checkpoints do; the release's codec does not)."""
        return self.encoder.ctc_head is not None

    def _require_ctc(self) -> None:
        if self.encoder.ctc_head is None:
            raise ValueError("this codec has no CTC recogniser (encoder_config.ctc_alphabet is None); transcription "
                             "needs a checkpoint trained with one, such as MOSS-Speech-Nano's codec.")

    @torch.no_grad()
    def transcribe_codes(self, codes, lengths: torch.Tensor | Sequence[int] | None = None) -> list[str]:
        """Text of speech codes by greedy CTC decoding: (B, T) ids with `lengths`, a 1-D tensor or a list."""
        self._require_ctc()
        batch, lengths = self._code_batch(codes, lengths)
        batch, lengths = batch.to(self.device), lengths.to(self.device)
        mask = torch.arange(batch.shape[1], device=self.device)[None] < lengths[:, None]
        head = self.encoder.ctc_head
        log_probs = head(self.encoder.code_vectors(batch), mask)
        return head.greedy_decode(log_probs, lengths * self.config.encoder_config.ctc_upsample)

    @torch.no_grad()
    def words_per_code(self, codes, text: str) -> list[int]:
        """For one utterance's codes (1-D) and what was said, the index of the word each code says (CTC forced
        alignment on the codec's CTC head; see `MossSpeechCodecCTCHead.words_per_code`)."""
        self._require_ctc()
        if not isinstance(codes, torch.Tensor):
            codes = torch.as_tensor(list(codes))
        batch, _ = self._code_batch(codes, None)
        if batch.shape[0] != 1:
            raise ValueError(f"words_per_code aligns one utterance, got {batch.shape[0]}.")
        batch = batch.to(self.device)
        head = self.encoder.ctc_head
        log_probs = head(self.encoder.code_vectors(batch), torch.ones_like(batch, dtype=torch.bool))
        return head.words_per_code(log_probs[0], text)

    @torch.no_grad()
    def transcribe(self, audio, sampling_rate: int | None = None, batch_size: int = 32) -> list[str]:
        """Text of one waveform or a list (any rate): its codes, recognised by the codec's CTC head."""
        self._require_ctc()
        codes = self.encode(audio, sampling_rate=sampling_rate, batch_size=batch_size).codes
        texts = [""] * len(codes)
        nonempty = [i for i, c in enumerate(codes) if c.numel()]
        for start in range(0, len(nonempty), batch_size):
            rows = nonempty[start : start + batch_size]
            for i, text in zip(rows, self.transcribe_codes([codes[i] for i in rows])):
                texts[i] = text
        return texts

    # ------------------------------------------------------------ voice prompt
    @torch.no_grad()
    def voice_prompt(self, audio, sampling_rate: int) -> MossSpeechVoicePrompt:
        """Condition decoding on a speaker: prompt codes, 24 kHz prompt mel and CAM++ x-vector of `audio`.

        Without a speaker encoder (`speaker_config=None`) the x-vector is zeros: the prompt's codes and mel alone
        carry the voice. `audio` must hold at least one code's worth of speech (80 ms at release settings; a few
        seconds of clean speech work best), else `ValueError`.
        """
        (wav,) = prepare_waveforms(audio, sampling_rate, target_rate=None)
        device = self.device
        out_rate = self.config.output_sampling_rate
        wav_out = torchaudio.functional.resample(wav, sampling_rate, out_rate) if sampling_rate != out_rate else wav
        # The prompt keeps whole codes only: one code needs token_mel_ratio mel frames of prompt_mel_hop_length.
        needed = self.config.flow_config.token_mel_ratio * prompt_mel_hop_length(out_rate)
        if wav_out.numel() < needed:
            raise ValueError(f"`audio` is {1000 * wav.numel() / sampling_rate:.1f} ms long: a voice prompt needs at "
                             f"least {1000 * needed / out_rate:.0f} ms (one code); a few seconds of speech work best.")
        codes = self.encode(wav, sampling_rate=sampling_rate).codes[0]
        mel = prompt_mel_spectrogram(wav_out.to(device), self.config.flow_config.output_size, out_rate)
        ratio = self.config.flow_config.token_mel_ratio
        n_tokens = min(mel.shape[0] // ratio, codes.numel())
        if self.speaker_encoder is None:
            embedding = torch.zeros(self.config.flow_config.spk_embed_dim)
        else:
            wav_16k = torchaudio.functional.resample(wav, sampling_rate, 16000) if sampling_rate != 16000 else wav
            embedding = self.speaker_encoder.embed([wav_16k.to(device)])[0]
        return MossSpeechVoicePrompt(
            tokens=codes[:n_tokens].cpu(), mel=mel[: n_tokens * ratio].float().cpu(),
            speaker_embedding=embedding.float().cpu(), metadata={"sampling_rate": sampling_rate},
        )

    # ------------------------------------------------------------------ decode
    def _code_batch(
        self, codes, lengths: torch.Tensor | Sequence[int] | None
    ) -> tuple[torch.LongTensor, torch.LongTensor]:
        """Normalise codes given as (B, T), (B, 1, T), a 1-D tensor or a list of sequences; validate the range."""
        if isinstance(codes, torch.Tensor):
            if codes.dtype.is_floating_point or codes.dtype == torch.bool:
                raise TypeError(f"codes must be integer ids, got dtype {codes.dtype}.")
            if codes.ndim == 3 and codes.shape[1] == 1:
                codes = codes[:, 0]
            if codes.ndim == 1:
                codes = codes[None]
            if codes.ndim != 2:
                raise ValueError(f"codes must be (batch, length), (batch, 1, length) or 1-D, got {tuple(codes.shape)}.")
            if codes.numel() == 0:
                raise ValueError(f"codes is empty (shape {tuple(codes.shape)}): pass at least one code per row.")
            if lengths is None:
                lengths = torch.full((codes.shape[0],), codes.shape[1], dtype=torch.long)
            lengths = torch.as_tensor(lengths, dtype=torch.long)
            batch = codes.long()
        else:
            seqs = [torch.as_tensor(c) for c in codes]
            if not seqs:
                raise ValueError("codes is empty: pass at least one code sequence.")
            for i, s in enumerate(seqs):
                if s.numel() == 0:  # checked first: torch reads an empty list as float32
                    raise ValueError(f"codes[{i}] is empty: every code sequence needs at least one code.")
                if s.dtype.is_floating_point or s.dtype == torch.bool or s.ndim != 1:
                    raise ValueError(f"each code sequence must be 1-D integer ids, got {s.dtype} {tuple(s.shape)}.")
            lengths = torch.tensor([s.numel() for s in seqs], dtype=torch.long)
            batch = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)
            for i, s in enumerate(seqs):
                batch[i, : s.numel()] = s
        if lengths.shape != (batch.shape[0],) or bool((lengths < 1).any()) or bool((lengths > batch.shape[1]).any()):
            raise ValueError(f"lengths must give 1..{batch.shape[1]} codes per row, got {lengths.tolist()}.")
        valid = torch.arange(batch.shape[1])[None] < lengths[:, None]
        ids = batch[valid]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.num_codes):
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise ValueError(f"codes hold id {bad}, outside the codebook [0, {self.config.num_codes}).")
        return batch.masked_fill(~valid, 0), lengths

    def _prompt_batch(self, voice_prompt, batch: int, device: torch.device):
        """Stack prompts (one shared, one per row, or none = the release's zero defaults) into padded tensors."""
        shared = not isinstance(voice_prompt, (list, tuple))
        prompts = [voice_prompt] * batch if shared else voice_prompt
        if len(prompts) != batch:
            raise ValueError(f"got {len(prompts)} voice prompts for {batch} code sequences.")
        named = ([("voice_prompt", voice_prompt)] if shared
                 else [(f"voice_prompt[{i}]", p) for i, p in enumerate(prompts)])
        for name, p in named:  # before `tok_len` reads p.tokens
            if p is None:
                continue
            if not isinstance(p, MossSpeechVoicePrompt):
                raise TypeError(f"{name} must be a MossSpeechVoicePrompt or None, got {type(p).__name__}.")
            self.check_voice_prompt(p, name)
        cfg = self.config.flow_config
        tok_len = torch.tensor([0 if p is None else p.tokens.numel() for p in prompts], dtype=torch.long)
        mel_len = tok_len * cfg.token_mel_ratio
        tokens = torch.zeros(batch, int(tok_len.max()), dtype=torch.long)
        mel = torch.zeros(batch, int(mel_len.max()), cfg.output_size)
        embedding = torch.zeros(batch, cfg.spk_embed_dim)
        for i, p in enumerate(prompts):
            if p is None:
                continue
            tokens[i, : tok_len[i]] = p.tokens
            mel[i, : mel_len[i]] = p.mel[: mel_len[i]]
            embedding[i] = p.speaker_embedding
        return (tokens.to(device), tok_len.to(device), mel.to(device, self.dtype), mel_len.to(device),
                embedding.to(device, self.dtype))

    def check_voice_prompt(self, prompt: MossSpeechVoicePrompt, where: str = "voice_prompt") -> None:
        """Raise `ValueError` naming `where` unless `prompt` fits this codec: its mel bins, speaker-embedding size,
        mel length (`token_mel_ratio` frames per code) and codes match (as in a prompt made by a codec of the same
        sizes). `decode` and the stream decoders check every prompt they get."""
        cfg = self.config.flow_config
        made_by = "; was it made by another codec? Build it with this codec's voice_prompt()."
        if prompt.mel.shape[1] != cfg.output_size:
            raise ValueError(f"{where}: its mel has {prompt.mel.shape[1]} bins, this codec's flow uses "
                             f"{cfg.output_size}{made_by}")
        if prompt.speaker_embedding.numel() != cfg.spk_embed_dim:
            raise ValueError(f"{where}: its speaker embedding has {prompt.speaker_embedding.numel()} values, this "
                             f"codec's flow uses {cfg.spk_embed_dim}{made_by}")
        needed = prompt.tokens.numel() * cfg.token_mel_ratio
        if prompt.mel.shape[0] < needed:
            raise ValueError(f"{where}: its mel has {prompt.mel.shape[0]} frames, fewer than its "
                             f"{prompt.tokens.numel()} codes need ({cfg.token_mel_ratio} per code, {needed}){made_by}")
        low, high = (int(prompt.tokens.min()), int(prompt.tokens.max())) if prompt.tokens.numel() else (0, 0)
        if low < 0 or high >= self.config.num_codes:
            bad = low if low < 0 else high
            raise ValueError(f"{where}: its tokens hold code {bad}, outside this codec's codebook "
                             f"[0, {self.config.num_codes}){made_by}")

    @torch.no_grad()
    def decode(
        self,
        codes,
        lengths: torch.Tensor | Sequence[int] | None = None,
        voice_prompt: MossSpeechVoicePrompt | Sequence[MossSpeechVoicePrompt | None] | None = None,
        generator: torch.Generator | None = None,
    ) -> MossSpeechCodecDecodeOutput:
        """Speech of `codes` at 24 kHz, `samples_per_code` (1920) samples per code, batched.

        Args:
            codes: (B, T) / (B, 1, T) ids with `lengths`, a 1-D tensor, or a list of sequences.
            voice_prompt: One prompt for all rows, one per row, or `None` (no prompt: the release's defaults).
            generator: Random generator of HiFT's source phases and noise (the flow and Griffin-Lim are deterministic).
        """
        batch, lengths = self._code_batch(codes, lengths)
        device = self.device
        prompt = self._prompt_batch(voice_prompt, batch.shape[0], device)
        mel, mel_len = self.flow.inference(
            batch.to(device), lengths.to(device), *prompt[:2], *prompt[2:4], prompt[4],
            finalize=True, streaming=False, num_codes=self.config.num_codes,
        )
        waveforms, wav_len = self.vocoder(mel.float() if self.dtype == torch.float32 else mel, mel_len,
                                          generator=generator)
        return MossSpeechCodecDecodeOutput(waveforms=waveforms.float(), lengths=wav_len,
                                           sampling_rate=self.config.output_sampling_rate)

    # --------------------------------------------------------------- streaming
    def stream_decoder(
        self,
        voice_prompt: MossSpeechVoicePrompt | None = None,
        chunk_size: int = 25,
        overlap_frames: int | None = None,
        generator: torch.Generator | None = None,
    ) -> MossSpeechStreamDecoder:
        """A push-style streaming decoder for one utterance (see [`MossSpeechStreamDecoder`])."""
        return MossSpeechStreamDecoder(self, voice_prompt, chunk_size, overlap_frames, generator)

    def stream_decode(
        self,
        codes: Iterable[int | Sequence[int] | torch.Tensor],
        voice_prompt: MossSpeechVoicePrompt | None = None,
        chunk_size: int = 25,
        overlap_frames: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[torch.FloatTensor]:
        """Yield 24 kHz speech chunks (1-D float32) while codes arrive from `codes` (ids or groups of ids).

        The concatenated chunks have exactly `samples_per_code` × codes samples, like `decode`; see
        [`MossSpeechStreamDecoder`] for how chunks are made.
        """
        decoder = self.stream_decoder(voice_prompt, chunk_size, overlap_frames, generator)
        for item in codes:
            yield from decoder.push(item)
        tail = decoder.flush()
        if tail.numel():
            yield tail

    @staticmethod
    def expected_num_codes(num_samples: int, sampling_rate: int) -> int:
        """ceil(seconds × 12.5): the number of codes `encode` returns for that much audio."""
        return math.ceil(num_samples / sampling_rate * 12.5 - 1e-9)


class MossSpeechStreamDecoder:
    """Incremental speech decoding for one utterance: `push` codes as they are generated, get audio back.

    The flow decodes codes in its chunked (streaming) mode with cached keys/values ([`MossSpeechFlowStream`]: each
    code is computed once, and the mel equals a re-run of the streaming flow over everything received); `flush()`
    decodes the rest the same way, the last codes without lookahead. HiFT vocodes the mel seamlessly
    ([`MossSpeechVocoderStream`]: the excitation's phase is carried across chunks and each piece is vocoded with
    `overlap_frames` of context each side, default the vocoder's receptive field, so the stream equals a one-pass
    vocoding of its mel); its last `latency_frames` (~17) mel frames wait for the next chunk. Griffin-Lim vocodes
    the new frames with `overlap_frames` (default 8) frames of left context and cross-fades them with the held-back
    tail of the previous chunk.

    Chunk schedule: the vocoder always holds back `held_codes` codes of audio (HiFT: its latency frames; Griffin-Lim:
    the cross-fade), so the first chunk is decoded once `chunk_size + held_codes + 3` (flow lookahead) codes are in,
    and every later one `chunk_size` codes after the previous: each chunk but the flush's carries at least
    `chunk_size` codes of audio (a chunk_size below the hold-back would otherwise give empty first chunks). A
    `chunk_size` that is a multiple of the flow's attention chunk (5 codes) spares recomputing a partial chunk at
    every step. All chunks together have exactly `samples_per_code` × codes samples.
    """

    def __init__(
        self,
        codec: MossSpeechCodecModel,
        voice_prompt: MossSpeechVoicePrompt | None = None,
        chunk_size: int = 25,
        overlap_frames: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if chunk_size < 1 or (overlap_frames is not None and overlap_frames < 0):
            raise ValueError(f"chunk_size must be >= 1 and overlap_frames None or >= 0, got {chunk_size}, "
                             f"{overlap_frames}.")
        self.codec, self.chunk_size, self.overlap_frames, self.generator = codec, chunk_size, overlap_frames, generator
        cfg = codec.config.flow_config
        self.ratio, self.hop = cfg.token_mel_ratio, codec.config.vocoder_config.hop_length
        self.lookahead = cfg.pre_lookahead_len
        self.prompt = codec._prompt_batch(voice_prompt, 1, codec.device)
        tokens, token_len, mel, mel_len, embedding = self.prompt
        self.flow_stream = MossSpeechFlowStream(codec.flow, tokens[0, : int(token_len[0])], mel[0, : int(mel_len[0])],
                                                embedding[0], num_codes=codec.config.num_codes)
        self.vocoder_stream = None if codec.hift is None else MossSpeechVocoderStream(codec.hift, generator,
                                                                                      overlap_frames)
        overlap_frames = 8 if overlap_frames is None else overlap_frames
        self.overlap_frames = overlap_frames
        held_frames = overlap_frames if self.vocoder_stream is None else self.vocoder_stream.latency_frames
        self.held_codes = -(-held_frames // self.ratio)
        self.received: list[int] = []
        self.done_tokens = 0  # codes whose mel frames were vocoded
        self.mel_history: torch.Tensor | None = None  # the last <= overlap_frames mel frames vocoded (left context)
        self.held: torch.Tensor | None = None  # produced but not released: the next chunk cross-fades into it
        self.xfade = overlap_frames * self.hop
        self.finished = False

    @property
    def num_codes(self) -> int:
        return len(self.received)

    @torch.no_grad()
    def push(self, codes: int | Sequence[int] | torch.Tensor) -> list[torch.FloatTensor]:
        """Add codes; returns the audio chunks that became ready (usually zero or one)."""
        if self.finished:
            raise ValueError("this stream decoder was flushed; start a new one for another utterance.")
        if isinstance(codes, torch.Tensor):
            new = [int(x) for x in codes.reshape(-1).tolist()]
        elif isinstance(codes, (list, tuple)):
            new = [int(x) for x in codes]
        else:
            new = [int(codes)]
        bad = [c for c in new if not 0 <= c < self.codec.config.num_codes]
        if bad:
            raise ValueError(f"codes hold id {bad[0]}, outside the codebook [0, {self.codec.config.num_codes}).")
        self.received.extend(new)
        chunks = []
        while True:
            # The first step also covers the codes whose audio the vocoder holds back (see the class docstring).
            target = self.done_tokens + self.chunk_size + (self.held_codes if self.done_tokens == 0 else 0)
            if len(self.received) < target + self.lookahead:
                break
            mel = self.flow_stream.step(self.received[: target + self.lookahead], target)
            chunk = self._vocode(mel, last=False)
            self.done_tokens = target
            if chunk.numel():
                chunks.append(chunk.float())
        return chunks

    @torch.no_grad()
    def flush(self) -> torch.FloatTensor:
        """Decode whatever is left (the last codes without lookahead) and release the held-back audio."""
        self.finished = True
        device = self.codec.device
        if not self.received:
            return torch.zeros(0, device=device)
        mel = self.flow_stream.step(self.received, len(self.received), finalize=True)
        return self._vocode(mel, last=True).float()

    def _vocode(self, new_mel: torch.Tensor, last: bool) -> torch.Tensor:
        if self.vocoder_stream is not None:
            return self.vocoder_stream.push(new_mel, final=last)
        if not new_mel.shape[-1]:
            held, self.held = self.held, None
            return held if held is not None and last else torch.zeros(0, device=new_mel.device)
        hop = self.hop
        context = 0 if self.mel_history is None else min(self.overlap_frames, self.mel_history.shape[-1])
        mel_in = new_mel if context == 0 else torch.cat([self.mel_history[:, :, -context:], new_mel], dim=-1)
        wav, _ = self.codec.vocoder(mel_in.float(), None, generator=self.generator)
        wav = wav[0]
        # Only the left context of the next chunk is kept: the history is not re-concatenated at every chunk.
        history = new_mel if self.mel_history is None else torch.cat([self.mel_history, new_mel], dim=-1)
        self.mel_history = history[:, :, history.shape[-1] - min(self.overlap_frames, history.shape[-1]) :]
        if self.held is not None and context:
            overlap = context * hop
            # raised-cosine (Hann half-window) cross-fade: smoother than linear at both ends
            # on the vocoder's device (under a device_map it may differ from the codec's first component)
            fade_in = 0.5 - 0.5 * torch.cos(torch.linspace(0.0, math.pi, overlap, device=wav.device))
            wav = torch.cat([self.held[-overlap:] * (1 - fade_in) + wav[:overlap] * fade_in, wav[overlap:]])
        elif self.held is not None:
            wav = torch.cat([self.held, wav])
        if last or self.xfade == 0:
            self.held = None
            return wav
        keep = min(self.xfade, wav.numel())
        self.held = wav[-keep:]
        return wav[:-keep]


__all__ = [
    "MossSpeechCodecDecodeOutput",
    "MossSpeechStreamDecoder",
    "MossSpeechCodecEncodeOutput",
    "MossSpeechCodecModel",
    "MossSpeechCodecPreTrainedModel",
    "MossSpeechVoicePrompt",
    "prompt_mel_hop_length",
    "prompt_mel_spectrogram",
]

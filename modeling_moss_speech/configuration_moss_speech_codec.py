"""Configurations of the MOSS-Speech codec: speech tokenizer (Whisper-VQ encoder), flow-matching decoder, HiFT
vocoder and CAM++ speaker encoder. Defaults are the released codec's values; the encoder sizes follow
the GLM-4-Voice tokenizer the release derives from (20 heads, ffn 5120, 16 quantizer layers, 1500 positions)."""

from __future__ import annotations

from dataclasses import field

from huggingface_hub.dataclasses import strict
from transformers import PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

VOCODER_TYPES = ("hift", "griffin_lim")


def _positive(owner: str, **values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}.{name} must be a positive integer, got {value!r}.")


def _fill_list_defaults(config: PretrainedConfig, defaults: dict) -> None:
    # List fields default to None in the dataclass (a mutable default would be shared): fill them per instance.
    for name, value in defaults.items():
        if getattr(config, name) is None:
            setattr(config, name, value)


@strict
class MossSpeechCodecEncoderConfig(PretrainedConfig):
    """The causal Whisper-VQ speech tokenizer: 16 kHz log-mel → 12.5 Hz codes from one codebook.

    Only the first `quantize_position` layers exist when `quantize_encoder_only` (the release's token path).
    """

    model_type = "moss_speech_codec_encoder"
    base_config_key = "encoder_config"

    num_mel_bins: int = 128
    d_model: int = 1280
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    max_source_positions: int = 1500
    activation_function: str = "gelu"
    layer_norm_eps: float = 1e-5
    pooling_kernel_size: int = 4
    pooling_type: str = "avg"
    pooling_position: int = 16
    quantize_vocab_size: int = 16384
    quantize_position: int = 16
    quantize_encoder_only: bool = True
    encoder_causal_attention: bool = True
    encoder_causal_convolution: bool = True
    # None: the release's tokenizer (causal attention over the whole utterance, absolute sinusoidal positions added
    # before the layers), so a word's codes change with where in the utterance it is said. An int W: a local
    # tokenizer: each 50 Hz frame attends to itself and the W - 1 frames before it and no absolute positions are
    # added, so a code depends only on the audio shortly before it (`MossSpeechCodecEncoder.receptive_field`), the
    # same word giving the same codes wherever it falls.
    encoder_attention_window: int | None = None
    initializer_range: float = 0.02
    # Optional CTC recogniser on the codes (nano checkpoints; the release has none): `ctc_alphabet` lists the output
    # characters (CTC blank = index 0, character i -> i + 1), `ctc_layers` bidirectional layers over the code
    # vectors, `ctc_upsample` CTC frames per code (12.5 Hz codes are too slow for one character per frame).
    ctc_alphabet: str | None = None
    ctc_layers: int = 1
    ctc_upsample: int = 4

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        owner = "MossSpeechCodecEncoderConfig"
        _positive(owner, num_mel_bins=self.num_mel_bins, d_model=self.d_model, encoder_layers=self.encoder_layers,
                  encoder_attention_heads=self.encoder_attention_heads, encoder_ffn_dim=self.encoder_ffn_dim,
                  max_source_positions=self.max_source_positions, pooling_kernel_size=self.pooling_kernel_size,
                  quantize_vocab_size=self.quantize_vocab_size, quantize_position=self.quantize_position)
        if self.d_model % self.encoder_attention_heads:
            raise ValueError(f"{owner}: d_model ({self.d_model}) must be divisible by encoder_attention_heads "
                             f"({self.encoder_attention_heads}).")
        if self.pooling_type not in ("avg", "max"):
            raise ValueError(f"{owner}.pooling_type must be 'avg' or 'max', got {self.pooling_type!r}.")
        if self.pooling_position != self.quantize_position:
            raise ValueError(f"{owner}: pooling_position ({self.pooling_position}) must equal quantize_position "
                             f"({self.quantize_position}), as in the release.")
        if self.quantize_position > self.encoder_layers:
            raise ValueError(f"{owner}: quantize_position ({self.quantize_position}) exceeds encoder_layers "
                             f"({self.encoder_layers}).")
        if self.max_source_positions % self.pooling_kernel_size:
            raise ValueError(f"{owner}: max_source_positions must be a multiple of pooling_kernel_size.")
        if self.encoder_attention_window is not None:
            _positive(owner, encoder_attention_window=self.encoder_attention_window)
        if self.ctc_alphabet is not None:
            if not isinstance(self.ctc_alphabet, str) or not self.ctc_alphabet:
                raise ValueError(f"{owner}.ctc_alphabet must be a non-empty string or None, got {self.ctc_alphabet!r}.")
            if len(set(self.ctc_alphabet)) != len(self.ctc_alphabet):
                raise ValueError(f"{owner}.ctc_alphabet has repeated characters: {self.ctc_alphabet!r}.")
            _positive(owner, ctc_layers=self.ctc_layers, ctc_upsample=self.ctc_upsample)

    @property
    def num_layers_built(self) -> int:
        """Layers instantiated: only those up to the quantizer when `quantize_encoder_only`."""
        return self.quantize_position if self.quantize_encoder_only else self.encoder_layers

    @property
    def samples_per_token(self) -> int:
        """Input samples (16 kHz) per code: hop 160 × conv stride 2 × pooling 4 = 1280 (12.5 Hz)."""
        return 160 * 2 * self.pooling_kernel_size


@strict
class MossSpeechCodecFlowConfig(PretrainedConfig):
    """The CosyVoice2-style flow-matching decoder: codes → 80-bin mel at 50 Hz (4 frames per code)."""

    model_type = "moss_speech_codec_flow"
    base_config_key = "flow_config"

    vocab_size: int = 20480
    input_size: int = 512
    output_size: int = 80
    spk_embed_dim: int = 192
    token_mel_ratio: int = 4
    pre_lookahead_len: int = 3
    # UpsampleConformerEncoder
    encoder_attention_heads: int = 8
    encoder_linear_units: int = 2048
    encoder_num_blocks: int = 6
    encoder_num_up_blocks: int = 4
    encoder_dropout_rate: float = 0.1
    encoder_positional_dropout_rate: float = 0.1
    encoder_attention_dropout_rate: float = 0.1
    encoder_static_chunk_size: int = 5
    encoder_max_len: int = 5000
    layer_norm_eps: float = 1e-5
    # The conformer layers' own norms use 1e-12 in the release (its embed/after norms use layer_norm_eps).
    conformer_layer_norm_eps: float = 1e-12
    # CausalConditionalCFM and its estimator
    sigma_min: float = 1e-6
    t_scheduler: str = "cosine"
    inference_cfg_rate: float = 0.7
    training_cfg_rate: float = 0.2
    n_timesteps: int = 10
    estimator_channels: int = 256
    estimator_attention_head_dim: int = 64
    estimator_num_heads: int = 8
    estimator_n_blocks: int = 4
    estimator_num_mid_blocks: int = 12
    estimator_time_embed_dim: int = 1024
    estimator_static_chunk_size: int = 20
    # Chunked (streaming) mode only: static chunks before its own that an estimator attention query sees, besides
    # the voice prompt's frames, which stay visible. None: every earlier chunk (the release). A bound makes a long
    # stream's per-chunk cost and cache memory constant (the estimator attention otherwise reads the whole history
    # at every ODE step); the stream still equals re-running the chunked flow with the same bound.
    estimator_left_chunks: int | None = None
    noise_seed: int = 0
    noise_max_frames: int = 15000
    # Scale of the starting noise of the ODE at inference (Matcha-TTS's "temperature"). The release integrates from
    # unit noise (1.0). A small flow leaves that noise partly in its mel: the nano codec integrates from 0.0 (the
    # deterministic mean path); for the first nano flow that alone took the round trip of the 135 clean answer words
    # from 12 to 37 heard right by an independent recogniser.
    inference_noise_scale: float = 1.0
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        owner = "MossSpeechCodecFlowConfig"
        if not 0.0 <= self.inference_noise_scale <= 10.0:
            raise ValueError(f"{owner}.inference_noise_scale must lie in [0, 10], got {self.inference_noise_scale}.")
        _positive(owner, vocab_size=self.vocab_size, input_size=self.input_size, output_size=self.output_size,
                  spk_embed_dim=self.spk_embed_dim, token_mel_ratio=self.token_mel_ratio,
                  encoder_attention_heads=self.encoder_attention_heads, n_timesteps=self.n_timesteps,
                  estimator_channels=self.estimator_channels, estimator_num_heads=self.estimator_num_heads,
                  noise_max_frames=self.noise_max_frames)
        if self.input_size % self.encoder_attention_heads:
            raise ValueError(f"{owner}: input_size ({self.input_size}) must be divisible by encoder_attention_heads "
                             f"({self.encoder_attention_heads}).")
        if self.estimator_left_chunks is not None and (isinstance(self.estimator_left_chunks, bool)
                                                       or self.estimator_left_chunks < 0):
            raise ValueError(f"{owner}.estimator_left_chunks must be None or an integer >= 0, "
                             f"got {self.estimator_left_chunks!r}.")
        if self.t_scheduler not in ("cosine", "linear"):
            raise ValueError(f"{owner}.t_scheduler must be 'cosine' or 'linear', got {self.t_scheduler!r}.")


@strict
class MossSpeechCodecVocoderConfig(PretrainedConfig):
    """The HiFT vocoder: 80-bin mel at 50 Hz → 24 kHz waveform (480 samples per frame, 1920 per code)."""

    model_type = "moss_speech_codec_vocoder"
    base_config_key = "vocoder_config"

    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8
    sampling_rate: int = 24000
    nsf_alpha: float = 0.1
    nsf_sigma: float = 0.003
    nsf_voiced_threshold: float = 10.0
    upsample_rates: list[int] | None = None
    upsample_kernel_sizes: list[int] | None = None
    istft_n_fft: int = 16
    istft_hop_len: int = 4
    resblock_kernel_sizes: list[int] | None = None
    resblock_dilation_sizes: list[list[int]] | None = None
    source_resblock_kernel_sizes: list[int] | None = None
    source_resblock_dilation_sizes: list[list[int]] | None = None
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    f0_predictor_channels: int = 512
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        defaults = {
            "upsample_rates": [8, 5, 3],
            "upsample_kernel_sizes": [16, 11, 7],
            "resblock_kernel_sizes": [3, 7, 11],
            "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
            "source_resblock_kernel_sizes": [7, 7, 11],
            "source_resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
        }
        _fill_list_defaults(self, defaults)
        super().__post_init__(**kwargs)
        owner = "MossSpeechCodecVocoderConfig"
        if len(self.upsample_rates) != len(self.upsample_kernel_sizes):
            raise ValueError(f"{owner}: upsample_rates and upsample_kernel_sizes must have the same length.")
        if len(self.source_resblock_kernel_sizes) != len(self.upsample_rates):
            raise ValueError(f"{owner}: one source resblock per upsampling stage is needed.")
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes):
            raise ValueError(f"{owner}: resblock_kernel_sizes and resblock_dilation_sizes must have the same length.")

    @property
    def hop_length(self) -> int:
        """Output samples per mel frame: product of the upsampling rates × the iSTFT hop (480 at release size)."""
        hop = self.istft_hop_len
        for rate in self.upsample_rates:
            hop *= rate
        return hop


@strict
class MossSpeechCodecSpeakerConfig(PretrainedConfig):
    """The CAM++ speaker encoder: 80-bin Kaldi fbank of 16 kHz speech → a 192-d x-vector."""

    model_type = "moss_speech_codec_speaker"
    base_config_key = "speaker_config"

    feat_dim: int = 80
    embedding_size: int = 192
    growth_rate: int = 32
    bn_size: int = 4
    init_channels: int = 128
    fcm_channels: int = 32
    fcm_num_blocks: list[int] | None = None
    block_layers: list[int] | None = None
    block_kernel_sizes: list[int] | None = None
    block_dilations: list[int] | None = None
    sampling_rate: int = 16000
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        defaults = {"fcm_num_blocks": [2, 2], "block_layers": [12, 24, 16], "block_kernel_sizes": [3, 3, 3],
                    "block_dilations": [1, 2, 2]}
        _fill_list_defaults(self, defaults)
        super().__post_init__(**kwargs)
        if not len(self.block_layers) == len(self.block_kernel_sizes) == len(self.block_dilations):
            raise ValueError("MossSpeechCodecSpeakerConfig: block_layers, block_kernel_sizes and block_dilations "
                             "must have the same length.")


@strict
class MossSpeechCodecConfig(PretrainedConfig):
    """Configuration of [`MossSpeechCodecModel`]: the speech tokenizer plus the speech decoder.

    Input audio is resampled to `sampling_rate` (16 kHz) for the tokenizer; decoded speech comes out at
    `vocoder_config.sampling_rate` (24 kHz), `token_mel_ratio × vocoder hop` = 1920 samples per code.

    `vocoder_type`: `"hift"` (the release's neural vocoder) or `"griffin_lim"` (no weights: inverse mel +
    `griffin_lim_iters` Griffin-Lim iterations; `vocoder_config` then only gives the rate, hop and mel bins).
    `speaker_config=None` (explicitly; omitted = the release's CAM++) builds no speaker encoder: voice prompts then
    carry a zero x-vector and condition the flow through their codes and mel only.
    """

    model_type = "moss_speech_codec"
    sub_configs_defaults = {
        "encoder_config": MossSpeechCodecEncoderConfig,
        "flow_config": MossSpeechCodecFlowConfig,
        "vocoder_config": MossSpeechCodecVocoderConfig,
        # Optional: an explicit None means "no speaker encoder" (nano checkpoints).
        "speaker_config": SubConfigSpec(MossSpeechCodecSpeakerConfig, optional=True),
    }

    encoder_config: MossSpeechCodecEncoderConfig | dict | None = None
    flow_config: MossSpeechCodecFlowConfig | dict | None = None
    vocoder_config: MossSpeechCodecVocoderConfig | dict | None = None
    # An empty dict (the default) builds the release's CAM++; None builds none.
    speaker_config: MossSpeechCodecSpeakerConfig | dict | None = field(default_factory=dict)
    sampling_rate: int = 16000
    vocoder_type: str = "hift"
    griffin_lim_iters: int = 32
    return_dict: bool | None = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.flow_config.output_size != self.vocoder_config.in_channels:
            raise ValueError(
                f"MossSpeechCodecConfig: the flow's mel bins ({self.flow_config.output_size}) must equal the "
                f"vocoder's input channels ({self.vocoder_config.in_channels})."
            )
        if self.vocoder_type not in VOCODER_TYPES:
            raise ValueError(f"MossSpeechCodecConfig.vocoder_type must be one of {VOCODER_TYPES}, got "
                             f"{self.vocoder_type!r}.")
        _positive("MossSpeechCodecConfig", griffin_lim_iters=self.griffin_lim_iters)
        vocoder = self.vocoder_config
        if self.vocoder_type == "griffin_lim" and vocoder.hop_length * 50 != vocoder.sampling_rate:
            raise ValueError(f"MossSpeechCodecConfig: Griffin-Lim inverts the flow's 50 Hz mel, so the vocoder's hop "
                             f"({vocoder.hop_length}) must be sampling_rate / 50 ({vocoder.sampling_rate / 50:g}).")
        if self.speaker_config is not None and self.flow_config.spk_embed_dim != self.speaker_config.embedding_size:
            raise ValueError(
                f"MossSpeechCodecConfig: flow spk_embed_dim ({self.flow_config.spk_embed_dim}) must equal the "
                f"speaker encoder's embedding_size ({self.speaker_config.embedding_size})."
            )
        if self.flow_config.vocab_size < self.encoder_config.quantize_vocab_size:
            raise ValueError(
                f"MossSpeechCodecConfig: the flow's input embedding ({self.flow_config.vocab_size} rows) must cover "
                f"the codebook ({self.encoder_config.quantize_vocab_size} codes)."
            )

    @property
    def num_codes(self) -> int:
        """Valid speech codes are `0 .. num_codes - 1` (the release's flow embeds more rows; they are garbage)."""
        return self.encoder_config.quantize_vocab_size

    @property
    def output_sampling_rate(self) -> int:
        return self.vocoder_config.sampling_rate

    @property
    def samples_per_code(self) -> int:
        """Output samples per code: 1920 at release size (4 mel frames × 480)."""
        return self.flow_config.token_mel_ratio * self.vocoder_config.hop_length


__all__ = [
    "MossSpeechCodecConfig",
    "MossSpeechCodecEncoderConfig",
    "MossSpeechCodecFlowConfig",
    "MossSpeechCodecSpeakerConfig",
    "MossSpeechCodecVocoderConfig",
]

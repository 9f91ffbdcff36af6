"""moss-speech: MOSS-Speech (true speech-to-speech LLM) for Hugging Face Transformers.

Importing the package registers its classes with the Auto* factories, so
`AutoModelForCausalLM.from_pretrained(path)` loads a MOSS-Speech checkpoint on the current transformers.
"""

from transformers import AutoConfig, AutoFeatureExtractor, AutoModel, AutoModelForCausalLM

from .chat_moss_speech import MossSpeechAudioStreamer, MossSpeechChat
from .configuration_moss_speech import MossSpeechConfig
from .configuration_moss_speech_codec import (
    MossSpeechCodecConfig,
    MossSpeechCodecEncoderConfig,
    MossSpeechCodecFlowConfig,
    MossSpeechCodecSpeakerConfig,
    MossSpeechCodecVocoderConfig,
)
from .feature_extraction_moss_speech import MossSpeechFeatureExtractor
from .generation_moss_speech import (
    MossSpeechGenerateOutput,
    MossSpeechGenerationConfig,
)
from .loading import CheckpointError
from .modeling_moss_speech import (
    MossSpeechCausalLMOutputWithPast,
    MossSpeechForCausalLM,
    MossSpeechModel,
    MossSpeechModelOutputWithPast,
    MossSpeechPreTrainedModel,
)
from .modeling_moss_speech_codec import (
    MossSpeechCodecDecodeOutput,
    MossSpeechCodecEncodeOutput,
    MossSpeechCodecModel,
    MossSpeechVoicePrompt,
)
from .processing_moss_speech import MossSpeechProcessor, MossSpeechResponse, register_processor

__version__ = "0.1.0"

AutoConfig.register(MossSpeechConfig.model_type, MossSpeechConfig, exist_ok=True)
AutoModel.register(MossSpeechConfig, MossSpeechModel, exist_ok=True)
AutoModelForCausalLM.register(MossSpeechConfig, MossSpeechForCausalLM, exist_ok=True)
AutoConfig.register(MossSpeechCodecConfig.model_type, MossSpeechCodecConfig, exist_ok=True)
AutoModel.register(MossSpeechCodecConfig, MossSpeechCodecModel, exist_ok=True)
AutoFeatureExtractor.register(MossSpeechCodecConfig, MossSpeechFeatureExtractor, exist_ok=True)
register_processor()  # AutoProcessor; kept out of the processing module's import (see register_processor)

__all__ = [
    "CheckpointError",
    "MossSpeechCausalLMOutputWithPast",
    "MossSpeechCodecConfig",
    "MossSpeechCodecDecodeOutput",
    "MossSpeechCodecEncodeOutput",
    "MossSpeechCodecEncoderConfig",
    "MossSpeechCodecFlowConfig",
    "MossSpeechCodecModel",
    "MossSpeechCodecSpeakerConfig",
    "MossSpeechCodecVocoderConfig",
    "MossSpeechFeatureExtractor",
    "MossSpeechVoicePrompt",
    "MossSpeechProcessor",
    "MossSpeechResponse",
    "MossSpeechAudioStreamer",
    "MossSpeechChat",
    "register_processor",
    "MossSpeechConfig",
    "MossSpeechForCausalLM",
    "MossSpeechGenerateOutput",
    "MossSpeechGenerationConfig",
    "MossSpeechModel",
    "MossSpeechModelOutputWithPast",
    "MossSpeechPreTrainedModel",
    "__version__",
]

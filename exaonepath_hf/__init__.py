"""exaonepath-hf: EXAONEPath (arXiv 2408.00380) as a Hugging Face model, with Macenko built in.

Importing the package registers the classes with the transformers Auto classes, so
`AutoModel.from_pretrained(folder)` and `AutoImageProcessor.from_pretrained(folder)` work on a converted
folder without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification

from .configuration_exaonepath import ExaonePathConfig
from .image_processing_exaonepath import ExaonePathImageProcessor
from .modeling_exaonepath import ExaonePathForImageClassification, ExaonePathModel, ExaonePathPreTrainedModel
from .stain_normalization import DEFAULT_STAIN_REFERENCE, MacenkoNormalizer, MacenkoOutput, StainReference

__version__ = "0.1.0"

AutoConfig.register(ExaonePathConfig.model_type, ExaonePathConfig, exist_ok=True)
AutoModel.register(ExaonePathConfig, ExaonePathModel, exist_ok=True)
AutoModelForImageClassification.register(ExaonePathConfig, ExaonePathForImageClassification, exist_ok=True)
AutoImageProcessor.register(
    ExaonePathConfig, image_processor_classes={"torchvision": ExaonePathImageProcessor}, exist_ok=True
)

__all__ = [
    "DEFAULT_STAIN_REFERENCE",
    "ExaonePathConfig",
    "ExaonePathForImageClassification",
    "ExaonePathImageProcessor",
    "ExaonePathModel",
    "ExaonePathPreTrainedModel",
    "MacenkoNormalizer",
    "MacenkoOutput",
    "StainReference",
    "__version__",
]

"""exaonepath-hf: EXAONEPath (arXiv 2408.00380) as a Hugging Face model, with Macenko built in.

Importing the package registers the classes with the transformers Auto classes, so
`AutoModel.from_pretrained(folder)` works on a converted folder without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from .configuration_exaonepath import ExaonePathConfig
from .modeling_exaonepath import ExaonePathForImageClassification, ExaonePathModel, ExaonePathPreTrainedModel

__version__ = "0.1.0"

AutoConfig.register(ExaonePathConfig.model_type, ExaonePathConfig, exist_ok=True)
AutoModel.register(ExaonePathConfig, ExaonePathModel, exist_ok=True)
AutoModelForImageClassification.register(ExaonePathConfig, ExaonePathForImageClassification, exist_ok=True)

__all__ = [
    "ExaonePathConfig",
    "ExaonePathForImageClassification",
    "ExaonePathModel",
    "ExaonePathPreTrainedModel",
    "__version__",
]

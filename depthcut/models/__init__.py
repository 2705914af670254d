"""depthcut's models: the papers' CIFAR architectures and library models, one family a file.

Every family registers itself in its own file (`registry.register_family`); this package
imports them, in the order help and error messages list them, and re-exports the API.
A new family is one new file imported here (or registered by the user's own code).
"""

# ruff: noqa: I001, F401 - imported in registration order (help and error messages list it)
from depthcut.models.registry import (
    FAMILIES,
    MODELS,
    PAPER_LR,
    PAPER_LR_OTHER,
    ModelFamily,
    ModelSpec,
    build_model,
    canonical_name,
    count_parameters,
    default_activation,
    find_family,
    match_family,
    paper_lr,
    register_family,
    takes_image_size,
    takes_width,
    unregister_family,
)
from depthcut.models.parts import ACTIVATIONS, architecture_family, make_activation, scaled
from depthcut.models.resnet import BasicBlock, ResNet18
from depthcut.models.vgg import VGG16, VGG16_LAYOUT
from depthcut.models.mobilenetv2 import (
    MOBILENETV2_CIFAR,
    ConvBNAct,
    InvertedResidual,
    MobileNetV2,
)
from depthcut.models.swin import PatchMerging, SwinBlock, SwinT, WindowAttention
from depthcut.models.transformer import (
    MASKED_SCORE,
    EncoderBlock,
    SelfAttention,
    TransformerEncoder,
)
from depthcut.models.library import (
    Library,
    build_external,
    parse_name,
    reads_tokens,
    register_library,
)
from depthcut.models import torchvision, timm, hf, user
from depthcut.models.adapt import ModelInputError, adapt_stem, check_runs, unshare_activations
from depthcut.models.hf import HFSequenceClassifier, mark_attention_leaves

__all__ = [
    "ACTIVATIONS",
    "FAMILIES",
    "MASKED_SCORE",
    "MOBILENETV2_CIFAR",
    "MODELS",
    "PAPER_LR",
    "PAPER_LR_OTHER",
    "VGG16",
    "VGG16_LAYOUT",
    "BasicBlock",
    "ConvBNAct",
    "EncoderBlock",
    "HFSequenceClassifier",
    "InvertedResidual",
    "Library",
    "MobileNetV2",
    "ModelInputError",
    "ModelFamily",
    "ModelSpec",
    "PatchMerging",
    "ResNet18",
    "SelfAttention",
    "SwinBlock",
    "SwinT",
    "TransformerEncoder",
    "WindowAttention",
    "adapt_stem",
    "architecture_family",
    "build_external",
    "reads_tokens",
    "build_model",
    "canonical_name",
    "check_runs",
    "count_parameters",
    "default_activation",
    "find_family",
    "make_activation",
    "mark_attention_leaves",
    "match_family",
    "paper_lr",
    "parse_name",
    "register_family",
    "register_library",
    "scaled",
    "takes_image_size",
    "takes_width",
    "unregister_family",
    "unshare_activations",
]

"""Example models: ordinary LightningModules with no reprlens code inside.

reprlens wraps them exactly as it wraps a user's own model (callbacks address their layers by dotted
names such as ``backbone.layer3`` or ``encoder.fc``).

* :class:`SimCLR`: small CIFAR-style ResNet backbone + MLP projector, NT-Xent loss on two views.
* :class:`ConvAutoencoder`: conv encoder -> embedding -> decoder, plus a jointly trained linear head.
* :class:`Classifier`: a small CNN classifier.

Batches follow the reprlens convention (dicts with ``"image"``, ``"label"``, ``"views"``) and plain
``(x, y)`` / lightly-style ``(views, y)`` tuples are accepted too.
"""

from reprlens.models.autoencoder import ConvAutoencoder
from reprlens.models.classifier import Classifier
from reprlens.models.simclr import BasicBlock, SimCLR, SmallResNet, nt_xent_loss

__all__ = ["BasicBlock", "Classifier", "ConvAutoencoder", "SimCLR", "SmallResNet", "nt_xent_loss"]

"""The paper's training side: ``zfk train``'s recipe (:mod:`.recipe`), data and augmentation
(:mod:`.data`), the Table 3 ablations (:mod:`.ablations`) and the loop with its resumable state
and DDP (:mod:`.loop`)."""

from .ablations import ABLATIONS, TRAIN_ARCHITECTURES, AblatedZFNet, build_network
from .loop import TrainConfig, Training, checkpoint_name
from .recipe import Recipe, initialise, renormalise_filters

__all__ = ["ABLATIONS", "TRAIN_ARCHITECTURES", "AblatedZFNet", "build_network", "TrainConfig", "Training",
           "checkpoint_name", "Recipe", "initialise", "renormalise_filters"]

"""The keys hemorrhage-hf writes into a model's ``config.json``, in one place.

Modifications write them; measurement and loading read them. Both import from here, so neither reaches into the other.
"""

#: The spec string and parameters of the modification that made a checkpoint.
MODIFICATION_ATTRIBUTE = "hemorrhage_modification"
#: Reference layer index → modified layer index, for models whose layers moved (expansion, layer pruning).
LAYER_MAP_ATTRIBUTE = "hemorrhage_layer_map"
#: Where an expansion inserted layers and how it initialised them.
EXPANSION_ATTRIBUTE = "hemorrhage_expansion"
#: The activation-aware per-channel scales a scaling modification searched.
SCALING_ATTRIBUTE = "hemorrhage_scaling"
#: The sparsity pattern and measured sparsity of a pruned checkpoint.
SPARSITY_ATTRIBUTE = "hemorrhage_sparsity"
#: What a structured pruning removed (heads, channels, layers).
STRUCTURE_ATTRIBUTE = "hemorrhage_structure"
#: The gradient weight alpha a gradient-aware pruning used: the candidates tried, their loss on the held-out share
#: of the calibration sequences, and the one kept.
PRUNING_ALPHA_ATTRIBUTE = "hemorrhage_pruning_alpha"

"""rectiflow.nn: layers of the FLUX transformer (RoPE, attention, embeddings, norms, modulation, blocks)."""

from rectiflow.nn.attention import SelfAttention, attention, qk_norm_rope
from rectiflow.nn.blocks import DoubleStreamBlock, LastLayer, SingleStreamBlock
from rectiflow.nn.embeddings import MLPEmbedder, sincos_2d_embedding, timestep_embedding
from rectiflow.nn.modulation import Modulation, ModulationOut, modulate
from rectiflow.nn.norms import QKNorm, RMSNorm
from rectiflow.nn.rope import EmbedND, RopeTable, apply_rope, rope_angles, rotate

__all__ = [
    "SelfAttention", "attention", "DoubleStreamBlock", "LastLayer", "SingleStreamBlock", "MLPEmbedder",
    "sincos_2d_embedding", "timestep_embedding", "Modulation", "ModulationOut", "modulate", "QKNorm",
    "RMSNorm", "EmbedND", "RopeTable", "apply_rope", "rope_angles", "rotate", "qk_norm_rope",
]

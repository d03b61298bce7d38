"""NCE: the negative conditional entropy of target given source labels (Tran et al., ICCV 2019).

"Transferability and Hardness of Supervised Classification Tasks", Tran, Nguyen,
Hassner (ICCV 2019, arXiv:1908.08142). With ``z_i`` the source label of example ``i``
(here: the source model's argmax prediction) and ``y_i`` its target label,

    P̂(y, z) = #{i: y_i = y, z_i = z} / N,     P̂(z) = Σ_y P̂(y, z)
    NCE = −H(Y | Z) = Σ_{y, z} P̂(y, z) · log( P̂(y, z) / P̂(z) )

``≤ 0``, higher is better; ``0`` when ``z`` determines ``y`` (e.g. identical labelings).
"""
from __future__ import annotations

import numpy as np

from tl_jax.transferability._checks import check_labels, class_indices


def nce(source_labels, target_labels) -> float:
    """NCE of integer ``source_labels`` ``[N]`` for integer ``target_labels`` ``[N]`` (see module doc).

    Raises ``ValueError`` for fewer than 2 target classes or mismatched lengths.
    """
    z = check_labels(source_labels, "source_labels", "nce", min_classes=1)
    y = check_labels(target_labels, "target_labels", "nce", n=len(z))
    _, zi = class_indices(z)
    _, yi = class_indices(y)
    joint = np.zeros((yi.max() + 1, zi.max() + 1))
    np.add.at(joint, (yi, zi), 1.0)
    joint /= len(y)
    pz = joint.sum(0, keepdims=True)
    nz = joint > 0
    return float(np.sum(joint[nz] * np.log((joint / pz)[nz])))

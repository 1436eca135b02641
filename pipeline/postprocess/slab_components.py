"""26-connected components labelled slab by slab: scipy's components without a full-size label map.

:class:`SlabComponents` labels a mask a few planes of its first axis at a time (``scipy.ndimage.label``
per slab), joins the slab components that touch across each slab face (26-connectivity: a voxel of a
slab's last plane touches the 3x3 voxels facing it in the next slab's first plane) and numbers the joined
components as a full-volume ``scipy.ndimage.label`` does: in the order of their first voxel in C order.
That is the order of each component's smallest slab-local label in its first slab (slabs follow the first
axis, and scipy numbers a slab's components by first voxel too), so the numbering, the sizes and the
bounding boxes are those of the full-volume labelling, exactly (``tests/postprocess/test_slab_components.py``).

The memory is one slab's labels (int64), the per-slab component counts and the face pairs: not the
2 or 4 bytes per voxel of a full label map. What needs the voxels of a component again
(:meth:`SlabComponents.slabs`) relabels each slab (the same labels: labelling is deterministic) and maps
its local labels to the global ones.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

FULL_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)  # 26-neighbourhood
SLAB_VOXELS = 1 << 21  # voxels per slab (~2 M: 16 MB of int64 labels)

__all__ = ["SLAB_VOXELS", "SlabComponents", "slab_step"]


def slab_step(shape, slab_voxels: Optional[int] = None) -> int:
    """Planes of the first axis per slab: about ``slab_voxels`` (default :data:`SLAB_VOXELS`) voxels, at
    least one plane."""
    slab_voxels = SLAB_VOXELS if slab_voxels is None else slab_voxels
    plane = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    return max(1, int(slab_voxels) // max(1, plane))


class SlabComponents:
    """The 26-connected components of ``array == value`` (``value`` None: ``array != 0``), slab by slab.

    ``count``: the number of components; ``sizes[i]``: the voxels of component ``i + 1``; ``boxes[i]``:
    its bounding box (a tuple of slices, as ``scipy.ndimage.find_objects`` gives). ``step``: planes of
    the first axis per slab (default: about :data:`SLAB_VOXELS` voxels per slab). ``array`` must not
    change before :meth:`slabs` has read each slab (a slab may be changed once handed over).
    """

    def __init__(self, array: np.ndarray, value: Optional[int] = None, step: Optional[int] = None):
        self.array = array
        self.value = value
        if array.ndim != 3:
            raise ValueError(f"SlabComponents: expected a 3D array, found shape {array.shape}")
        self.step = int(step) if step is not None else slab_step(array.shape)
        if self.step < 1:
            raise ValueError(f"SlabComponents: expected a slab of one plane or more, found {step}")
        self.starts = list(range(0, array.shape[0], self.step))
        self._label_all()

    # --- labelling ------------------------------------------------------------------------------

    def mask(self, k0: int, k1: int) -> np.ndarray:
        """The mask of planes ``k0:k1`` (a boolean copy of that slab only)."""
        piece = self.array[k0:k1]
        return piece != 0 if self.value is None else piece == self.value

    def _label(self, k0: int) -> tuple[np.ndarray, int]:
        k1 = min(k0 + self.step, self.array.shape[0])
        local = np.empty((k1 - k0,) + self.array.shape[1:], dtype=np.intp)
        count = ndimage.label(self.mask(k0, k1), structure=FULL_CONNECTIVITY, output=local)
        return local, int(count)

    def _label_all(self) -> None:
        bases, sizes, boxes, pairs = [], [], [], []
        total = 0
        previous = None  # the last plane of the previous slab, in node numbers (-1: background)
        for k0 in self.starts:
            local, count = self._label(k0)
            bases.append(total)
            if count:
                sizes.append(np.bincount(local.ravel(), minlength=count + 1)[1:])
                box = np.array([[x for s in piece for x in (s.start, s.stop)]
                                for piece in ndimage.find_objects(local, count)], dtype=np.int64)
                box[:, :2] += k0
                boxes.append(box)
            first = local[0] - 1 + total
            if previous is not None:
                face = _face_pairs(previous, first, total)
                if face is not None:
                    pairs.append(face)
            previous = np.where(local[-1] > 0, local[-1] - 1 + total, -1)
            total += count
            del local
        self._bases = bases
        self._nodes = total
        if total == 0:
            self.count = 0
            self.sizes = np.zeros(0, dtype=np.int64)
            self.boxes = []
            self._node_label = np.zeros(0, dtype=np.intp)
            return
        node_sizes = np.concatenate(sizes).astype(np.int64)
        node_boxes = np.concatenate(boxes)  # (nodes, 6): start, stop per axis
        del sizes, boxes
        if pairs:
            a, b = np.concatenate(pairs, axis=1)
            del pairs
            graph = coo_matrix((np.ones(a.size, dtype=np.int8), (a, b)), shape=(total, total))
            count, group = connected_components(graph, directed=False)
        else:
            count, group = total, np.arange(total)
        # number the groups by their smallest node (its first voxel in C order): scipy's numbering
        first_node = np.full(count, total, dtype=np.int64)
        np.minimum.at(first_node, group, np.arange(total))
        rank = np.empty(count, dtype=np.intp)
        rank[np.argsort(first_node, kind="stable")] = np.arange(1, count + 1)
        self._node_label = rank[group]
        self.count = int(count)
        order = self._node_label - 1
        self.sizes = np.zeros(count, dtype=np.int64)
        np.add.at(self.sizes, order, node_sizes)
        lo = np.full((count, 3), np.iinfo(np.int64).max, dtype=np.int64)
        hi = np.zeros((count, 3), dtype=np.int64)
        np.minimum.at(lo, order, node_boxes[:, 0::2])
        np.maximum.at(hi, order, node_boxes[:, 1::2])
        self.boxes = [tuple(slice(int(a), int(b)) for a, b in zip(lo[i], hi[i])) for i in range(count)]

    # --- the voxels again -----------------------------------------------------------------------

    def slabs(self, only: Optional[Iterable[int]] = None) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(k0, k1, labels)`` per slab: planes ``k0:k1`` labelled with the global component numbers
        (0: background; an int array of that slab only). ``only``: component numbers; just the slabs
        holding one of them (the others are not labelled again)."""
        rows = None if only is None else [self.boxes[int(i) - 1][0] for i in only]
        for index, k0 in enumerate(self.starts):
            k1 = min(k0 + self.step, self.array.shape[0])
            if rows is not None and not any(r.start < k1 and r.stop > k0 for r in rows):
                continue
            local, count = self._label(k0)
            if count:
                lut = np.zeros(count + 1, dtype=np.intp)
                base = self._bases[index]
                lut[1:] = self._node_label[base:base + count]
                local = lut[local]
            yield k0, k1, local


def _face_pairs(previous: np.ndarray, first: np.ndarray, base: int) -> Optional[np.ndarray]:
    """The node pairs (2, n) touching across a slab face (``None``: none): ``previous`` (the last plane
    of a slab, node numbers, -1 for background) and ``first`` (the next slab's first plane, local label
    - 1 + ``base``: below ``base`` for background), each voxel with the 3x3 facing it (26-connectivity)."""
    n0, n1 = previous.shape
    out = []
    for d0 in (-1, 0, 1):
        for d1 in (-1, 0, 1):
            a = previous[max(0, -d0):n0 - max(0, d0), max(0, -d1):n1 - max(0, d1)]
            b = first[max(0, d0):n0 - max(0, -d0), max(0, d1):n1 - max(0, -d1)]
            both = (a >= 0) & (b >= base)
            if both.any():
                out.append(np.stack([a[both], b[both]]))
    return np.unique(np.concatenate(out, axis=1), axis=1) if out else None

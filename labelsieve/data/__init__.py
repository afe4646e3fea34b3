"""Reading, validating and decoding labelled images, and caches of decoded pixels.

Modules: :mod:`~labelsieve.data.images` (the :class:`LabeledImages` collection), :mod:`~labelsieve.data.sources`
(folders and CSVs, validated), :mod:`~labelsieve.data.decode`, :mod:`~labelsieve.data.datasets`,
:mod:`~labelsieve.data.hashing`, :mod:`~labelsieve.data.imagecache`, :mod:`~labelsieve.data.transforms`
and :mod:`~labelsieve.data.noise` (synthetic label noise).
"""

from labelsieve.data.decode import IMAGE_EXTENSIONS, UnreadableImage, decode_image, load_image, to_rgb
from labelsieve.data.images import LabeledImages
from labelsieve.data.sources import default_classname, load_images, read_classnames, read_labels_csv

__all__ = ["IMAGE_EXTENSIONS", "LabeledImages", "UnreadableImage", "decode_image", "default_classname", "load_image",
           "load_images", "read_classnames", "read_labels_csv", "to_rgb"]

"""A seeded synthetic person re-identification dataset, written in Market-1501 folder format.

The project's machines hold no real re-id data, so training and tests run on people drawn here.
An identity is an appearance (clothing colours and patterns, body build, hair, skin, hat, bag);
each image of it is taken by one of a few cameras that differ in colour cast, exposure, blur,
resolution and background, with pose, occlusion and clutter varying per image. Some identities
are near-duplicates of another (same top, other trousers; same colours, other pattern...), so
colour alone does not identify a person.

The output is a pure function of the arguments: every random draw comes from its own
``numpy.random.Generator(PCG64(...))`` stream, keyed by (seed, purpose, index), and JPEGs are
written with a fixed quality. Generation happens in a temporary sibling folder that is renamed
into place once complete, with ``generation.json`` written last, so an interrupted run never
leaves a folder that looks finished.

One module per concern, in the order they build on each other: ``streams`` (the random
streams), ``appearance`` (who a person is), ``scene`` (cameras and their backdrop), ``figure``
(a pose and the painting of a body), ``render`` (one image), ``layout`` (pids, cameras, splits,
file names; every image written), ``store`` (checked arguments, the marker, atomic installation).
"""
from adaptive_l2.data.synthetic.layout import (DISTRACTOR_PID, GALLERY_DIR, JPEG_QUALITY,
                                               MAX_CAMERAS, MAX_PID, QUERY_DIR, TRAIN_DIR)
from adaptive_l2.data.synthetic.store import (FORMAT_VERSION, GENERATION_WAIT_S, MARKER_FILE,
                                              dataset_folder_name, generate_synthetic_market)

__all__ = [
    "DISTRACTOR_PID",
    "FORMAT_VERSION",
    "GALLERY_DIR",
    "GENERATION_WAIT_S",
    "JPEG_QUALITY",
    "MARKER_FILE",
    "MAX_CAMERAS",
    "MAX_PID",
    "QUERY_DIR",
    "TRAIN_DIR",
    "dataset_folder_name",
    "generate_synthetic_market",
]

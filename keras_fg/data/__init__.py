"""Datasets, the synthetic fine-grained set, the tf.data input pipeline and the P×K sampler.

load_dataset(format, root, split, **options) -> ImageRecords
    formats: cub, folder, cars, aircraft, dogs, market1501
load_identity_folders(root, split)           re-ID on one folder per person, no cameras
SyntheticFineGrained(...)                    the embedded default dataset (no files)
make_pipeline(records_or_arrays, image_size, batch_size, training, ...)
PKSampler(labels, num_identities, num_instances, seed)
"""

from keras_fg.data.aircraft import load_aircraft
from keras_fg.data.cars import load_cars
from keras_fg.data.cub import load_cub
from keras_fg.data.datasets import FORMATS, load_dataset
from keras_fg.data.dogs import load_dogs
from keras_fg.data.folder import load_identity_folders, load_image_folder
from keras_fg.data.market1501 import load_market1501
from keras_fg.data.matfile import load_mat
from keras_fg.data.pipeline import SkipCounter, make_pipeline
from keras_fg.data.records import ImageRecords
from keras_fg.data.sampling import PKSampler
from keras_fg.data.synthetic import SyntheticFineGrained

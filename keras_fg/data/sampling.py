"""P×K identity sampling for metric learning and person re-identification."""

import numpy as np


class PKSampler:
    """Batches of P identities × K images each, for batch-hard triplet losses.

    An epoch is drawn as in the "bag of tricks" re-ID baseline (Luo et al., CVPR-W 2019): each
    identity's images are shuffled and cut into chunks of K (an identity with fewer than K images
    is filled up by drawing with replacement; a last incomplete chunk is dropped); then, while at
    least P identities have chunks left, P of them are picked at random and each gives its next
    chunk. Every batch therefore holds exactly K images of each of P distinct identities, ordered
    identity by identity.

    An epoch ends when fewer than P identities have chunks left, so a P close to the number of
    identities makes short epochs: with P equal to all of them, the identity with the fewest
    images ends the epoch (on mini-MARS's 16 training identities, P = 16 gives 6 batches of
    64 images an epoch, P = 8 gives 38 of 32). Keep P well below the number of identities.

    The draw is a NumPy generator seeded by `(seed, epoch)`: the same seed gives the same epochs.
    Each pass over `as_dataset()` (each Keras epoch) takes the next epoch.

    Args:
        labels: int array `(N,)` of identity labels.
        num_identities: P, identities per batch (at least 2).
        num_instances: K, images per identity (at least 1).
        seed: the random seed (None: a fresh random one).

    Example:

    >>> sampler = PKSampler([0, 0, 1, 1, 2, 2, 2], num_identities=2, num_instances=2, seed=0)
    >>> sampler.batch_size, sampler.epoch_batches(0).shape[1]
    (4, 4)
    """

    def __init__(self, labels, num_identities=16, num_instances=4, seed=None):
        self.labels = np.asarray(labels).reshape(-1)
        if num_identities < 2:
            raise ValueError(
                f"`num_identities` must be at least 2. Received: num_identities={num_identities}"
            )
        if num_instances < 1:
            raise ValueError(
                f"`num_instances` must be at least 1. Received: num_instances={num_instances}"
            )
        self.identities = np.unique(self.labels)
        if len(self.identities) < num_identities:
            raise ValueError(
                f"P×K sampling needs at least num_identities={num_identities} identities; the "
                f"labels hold only {len(self.identities)}"
            )
        self.num_identities = num_identities
        self.num_instances = num_instances
        self.seed = int(np.random.SeedSequence().entropy % 2**32) if seed is None else seed
        self.epoch = 0
        self._members = [np.flatnonzero(self.labels == identity) for identity in self.identities]

    @property
    def batch_size(self):
        return self.num_identities * self.num_instances

    def epoch_batches(self, epoch):
        """Index batches of one epoch: int64 array `(num_batches, P*K)`."""
        rng = np.random.default_rng([self.seed, epoch])
        k = self.num_instances
        chunks = []
        for members in self._members:
            if len(members) < k:
                members = rng.choice(members, size=k, replace=True)
            members = rng.permutation(members)
            chunks.append(list(members[: len(members) // k * k].reshape(-1, k)))
        batches = []
        while True:
            available = [i for i, left in enumerate(chunks) if left]
            if len(available) < self.num_identities:
                break
            chosen = rng.choice(available, size=self.num_identities, replace=False)
            batches.append(np.concatenate([chunks[i].pop(0) for i in chosen]))
        return np.array(batches, dtype=np.int64).reshape(-1, self.batch_size)

    def __iter__(self):
        """The index batches of the next epoch."""
        batches = self.epoch_batches(self.epoch)
        self.epoch += 1
        return iter(batches)

    def as_dataset(self):
        """A tf.data.Dataset of single indices, batch after batch; each pass is the next epoch."""
        import tensorflow as tf

        def indices():
            for batch in self:
                yield from batch

        return tf.data.Dataset.from_generator(indices, output_signature=tf.TensorSpec([], tf.int64))

"""Losses for part attention and metric learning."""

from keras_fg.losses.center_loss import center_loss, updated_centers
from keras_fg.losses.channel_grouping_loss import ChannelGroupingLoss, distance_loss, diversity_loss
from keras_fg.losses.triplet_loss import BatchHardTripletLoss, batch_hard_triplet_loss

"""keras_hub vision models that use BatchNormalization, in tiny configurations.

Built directly from their Backbone classes with small arguments and random
weights (never `from_preset`: nothing is downloaded). `HUB` lists every
family for the zoo; `FAST` names one per custom-layer family for the default
test run. Importing this module does not import keras_hub; the builders do.
"""

from __future__ import annotations


def _hub():
    import keras_hub

    return keras_hub.models


def _resnet(block_type="basic_block", filters=(64, 8, 8), blocks=(1, 1, 1), **kw):
    m = _hub()
    n = len(filters)
    return m.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[3],
        stackwise_num_filters=list(filters),
        stackwise_num_blocks=list(blocks),
        stackwise_num_strides=[1] + [2] * (n - 1),
        block_type=block_type,
        **kw,
    )


def resnet():
    return _resnet(image_shape=(32, 32, 3))


def resnet_v2():
    return _resnet("bottleneck_block", use_pre_activation=True, image_shape=(32, 32, 3))


def resnet_classifier():
    m = _hub()
    return m.ResNetImageClassifier(backbone=resnet(), num_classes=3)


def mobilenet():
    return _hub().MobileNetBackbone(
        stackwise_expansion=[[16, 24], [32, 32]],
        stackwise_num_blocks=[2, 2],
        stackwise_num_filters=[[8, 8], [16, 16]],
        stackwise_kernel_size=[[3, 3], [5, 5]],
        stackwise_num_strides=[[2, 1], [2, 1]],
        stackwise_se_ratio=[[None, None], [0.25, 0.25]],
        stackwise_activation=[["relu", "relu"], ["hard_swish", "hard_swish"]],
        stackwise_padding=[[1, 1], [2, 2]],
        output_num_filters=32,
        input_activation="hard_swish",
        output_activation="hard_swish",
        input_num_filters=8,
        image_shape=(32, 32, 3),
        depthwise_filters=8,
        depthwise_stride=2,
        depthwise_residual=False,
        squeeze_and_excite=0.5,
        last_layer_filter=32,
    )


def mobilenet_v5():
    return _hub().MobileNetV5Backbone(
        stackwise_block_types=[["er"], ["uir", "uir"]],
        stackwise_num_blocks=[1, 2],
        stackwise_num_filters=[[8], [16, 16]],
        stackwise_strides=[[2], [2, 1]],
        stackwise_act_layers=[["relu"], ["relu", "relu"]],
        stackwise_exp_ratios=[[2.0], [2.0, 2.0]],
        stackwise_se_ratios=[[0.0], [0.0, 0.0]],
        stackwise_dw_kernel_sizes=[[0], [3, 3]],
        stackwise_dw_start_kernel_sizes=[[0], [0, 0]],
        stackwise_dw_end_kernel_sizes=[[0], [0, 0]],
        stackwise_exp_kernel_sizes=[[3], [0, 0]],
        stackwise_pw_kernel_sizes=[[1], [0, 0]],
        stackwise_num_heads=[[0], [0, 0]],
        stackwise_key_dims=[[0], [0, 0]],
        stackwise_value_dims=[[0], [0, 0]],
        stackwise_kv_strides=[[0], [0, 0]],
        stackwise_use_cpe=[[False], [False, False]],
        image_shape=(32, 32, 3),
        stem_size=8,
        num_features=32,
        use_msfa=False,
        norm_layer="batch_norm",
    )


def efficientnet(num_features=1280):
    return _hub().EfficientNetBackbone(
        stackwise_kernel_sizes=[3, 3, 3],
        stackwise_num_repeats=[1, 1, 1],
        stackwise_input_filters=[8, 8, 16],
        stackwise_output_filters=[8, 16, 16],
        stackwise_expansion_ratios=[1, 2, 2],
        stackwise_squeeze_and_excite_ratios=[0.0, 0.0, 0.25],
        stackwise_strides=[1, 2, 2],
        stackwise_block_types=["fused", "fused", "unfused"],
        stackwise_force_input_filters=[0] * 3,
        stackwise_nores_option=[False] * 3,
        width_coefficient=1.0,
        depth_coefficient=1.0,
        num_features=num_features,
        input_shape=(32, 32, 3),
    )


def efficientnet_small_head():
    """`num_features` is not in EfficientNetBackbone's config (keras_hub 0.32):
    with a non-default value the config does not rebuild the model."""
    return efficientnet(num_features=32)


def hgnetv2():
    return _hub().HGNetV2Backbone(
        embedding_size=16,
        stem_channels=[3, 8, 16],
        hidden_act="relu",
        use_learnable_affine_block=False,
        image_shape=(32, 32, 3),
        depths=[1, 1],
        hidden_sizes=[32, 64],
        stackwise_stage_filters=[[16, 8, 32, 1, 1, 3], [32, 16, 64, 1, 1, 3]],
        apply_downsample=[False, True],
        use_lightweight_conv_block=[False, True],
    )


def cspnet():
    return _hub().CSPNetBackbone(
        stem_filters=8,
        stem_kernel_size=3,
        stem_strides=1,
        stackwise_strides=2,
        stackwise_depth=[1, 1],
        stackwise_num_filters=[8, 16],
        image_shape=(32, 32, 3),
        down_growth=True,
        bottle_ratio=(0.5,) + (1.0,),
        block_ratio=(1.0,) + (0.5,),
        expand_ratio=(2.0,) + (1.0,),
        block_type="dark_block",
        stage_type="csp",
        stem_padding="same",
    )


def densenet():
    return _hub().DenseNetBackbone(
        stackwise_num_repeats=[1, 2],
        compression_ratio=0.5,
        growth_rate=4,
        image_shape=(32, 32, 3),
    )


def xception():
    return _hub().XceptionBackbone(
        stackwise_conv_filters=[[8, 8], [16, 16], [16, 16]],
        stackwise_pooling=[False, True, False],
        image_shape=(71, 71, 3),
    )


def retinanet():
    return _hub().RetinaNetBackbone(
        image_encoder=_resnet(filters=(64, 8, 8, 8), blocks=(1, 1, 1, 1)),
        min_level=3,
        max_level=5,
        use_p5=True,
        use_fpn_batch_norm=True,
        image_shape=(64, 64, 3),
    )


def deeplab_v3():
    return _hub().DeepLabV3Backbone(
        image_encoder=_resnet(),
        low_level_feature_key="P2",
        spatial_pyramid_pooling_key="P4",
        dilation_rates=[2, 4],
        upsampling_size=4,
        projection_filters=8,
        image_shape=(32, 32, 3),
    )


def basnet():
    return _hub().BASNetBackbone(
        image_encoder=_resnet(filters=(64, 8, 8, 8), blocks=(1, 1, 1, 1)),
        num_classes=1,
        projection_filters=64,
        image_shape=(32, 32, 3),
    )


#: name -> (builder, input shape without batch)
HUB = {
    "hub_resnet": (resnet, (32, 32, 3)),
    "hub_resnet_v2": (resnet_v2, (32, 32, 3)),
    "hub_resnet_classifier": (resnet_classifier, (32, 32, 3)),
    "hub_mobilenet": (mobilenet, (32, 32, 3)),
    "hub_mobilenet_v5": (mobilenet_v5, (32, 32, 3)),
    "hub_efficientnet": (efficientnet, (32, 32, 3)),
    "hub_efficientnet_small_head": (efficientnet_small_head, (32, 32, 3)),
    "hub_hgnetv2": (hgnetv2, (32, 32, 3)),
    "hub_cspnet": (cspnet, (32, 32, 3)),
    "hub_densenet": (densenet, (32, 32, 3)),
    "hub_xception": (xception, (71, 71, 3)),
    "hub_retinanet": (retinanet, (64, 64, 3)),
    "hub_deeplab_v3": (deeplab_v3, (32, 32, 3)),
    "hub_basnet": (basnet, (32, 32, 3)),
}

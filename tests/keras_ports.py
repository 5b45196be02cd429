"""The two Keras tutorials' models, ported to Keras 3 from their text in ../shared/seeds/.

`test_keras_equivalence.py` builds these, copies their weights into attn_jax's parameter trees and
compares the two. The code follows the tutorials line by line; what differs, and why:

PatchConvNet (000_*.txt, written for TensorFlow 2's tf.keras):
- `tf.nn.gelu` -> `keras.activations.gelu` (both exact, erf, by default); `tf.Variable` class token
  -> `add_weight` (zeros); `tf.repeat`, `tf.concat`, `tf.squeeze` -> `keras.ops`.
- The model takes preprocessed images (attn_jax's models do; preprocessing is tested elsewhere), so
  the preprocessing and augmentation models and the custom train/test steps are left out.
- The dropout rates (0.2 in the text) are arguments, so that a test can set them to 0. The model's
  `call` takes `training` and passes it on, as `stateless_call` (used for gradients) requires.
- `tie=True` is the text's trunk: ONE list of layers wrapped in `depth` Sequentials, so every block
  is the same block. `tie=False` builds a fresh list of layers per block (independent blocks).

EANet and its ViT baseline (003_*.txt, Keras 3):
- The augmentation is left out (preprocessed images, as above); hyper-parameters are arguments
  instead of globals.
- `gelu_approximate` is the MLP's `ops.gelu(approximate=...)`; the text calls `ops.gelu` with its
  default, True (the tanh approximation); attn_jax's experiments use the exact one (False).
- The MLP's dropout follows `projection_dropout` (the text uses the function's default, 0.2, the
  same value as projection_dropout), so that a test can set every dropout to 0.
- `logits=True` drops the head's softmax (the text's `Dense(num_classes, activation="softmax")`),
  so that logits can be compared; `record` receives the layers, so that a test can find weights.

Import it after setting KERAS_BACKEND (the tests use "jax").
"""

import functools

import keras
from keras import layers, ops

# ---------------------------------------------------------------------------------------------
# PatchConvNet (keras-io examples/vision/patch_convnet)
# ---------------------------------------------------------------------------------------------


def build_convolutional_stem(dimensions):
    config = {
        "kernel_size": (3, 3),
        "strides": (2, 2),
        "activation": keras.activations.gelu,
        "padding": "same",
    }
    return keras.Sequential(
        [
            layers.Conv2D(filters=dimensions // 2, **config),
            layers.Conv2D(filters=dimensions, **config),
        ],
        name="convolutional_stem",
    )


class SqueezeExcite(layers.Layer):
    def __init__(self, ratio, **kwargs):
        super().__init__(**kwargs)
        self.ratio = ratio

    def build(self, input_shape):
        filters = input_shape[-1]
        self.squeeze = layers.GlobalAveragePooling2D(keepdims=True)
        self.reduction = layers.Dense(units=filters // self.ratio, activation="relu", use_bias=False)
        self.excite = layers.Dense(units=filters, activation="sigmoid", use_bias=False)
        self.multiply = layers.Multiply()

    def call(self, x):
        shortcut = x
        x = self.squeeze(x)
        x = self.reduction(x)
        x = self.excite(x)
        x = self.multiply([shortcut, x])
        return x


class Trunk(layers.Layer):
    def __init__(self, depth, dimensions, ratio, tie=True, **kwargs):
        super().__init__(**kwargs)
        self.ratio = ratio
        self.dimensions = dimensions
        self.depth = depth
        self.tie = tie

    def build(self, input_shape):
        config = {
            "filters": self.dimensions,
            "activation": keras.activations.gelu,
            "padding": "same",
        }

        def make_trunk_block():
            return [
                layers.LayerNormalization(epsilon=1e-6),
                layers.Conv2D(kernel_size=(1, 1), **config),
                layers.Conv2D(kernel_size=(3, 3), **config),
                SqueezeExcite(ratio=self.ratio),
                layers.Conv2D(kernel_size=(1, 1), filters=self.dimensions, padding="same"),
            ]

        if self.tie:  # the tutorial's code: one list of layers, wrapped `depth` times
            trunk_block = make_trunk_block()
            self.trunk_blocks = [keras.Sequential(trunk_block) for _ in range(self.depth)]
        else:
            self.trunk_blocks = [keras.Sequential(make_trunk_block()) for _ in range(self.depth)]
        self.add = layers.Add()
        self.flatten_spatial = layers.Reshape((-1, self.dimensions))

    def call(self, x):
        shortcut = x
        for trunk_block in self.trunk_blocks:
            output = trunk_block(x)
            shortcut = self.add([output, shortcut])
            x = shortcut
        x = self.flatten_spatial(x)
        return x


class AttentionPooling(layers.Layer):
    def __init__(self, dimensions, num_classes, attention_dropout=0.2, mlp_dropout=0.2, **kwargs):
        super().__init__(**kwargs)
        self.dimensions = dimensions
        self.num_classes = num_classes
        self.attention_dropout = attention_dropout
        self.mlp_dropout = mlp_dropout

    def build(self, input_shape):
        self.cls = self.add_weight(shape=(1, 1, self.dimensions), initializer="zeros", name="cls")
        self.attention = layers.MultiHeadAttention(
            num_heads=1, key_dim=self.dimensions, dropout=self.attention_dropout,
        )
        self.layer_norm1 = layers.LayerNormalization(epsilon=1e-6)
        self.layer_norm2 = layers.LayerNormalization(epsilon=1e-6)
        self.layer_norm3 = layers.LayerNormalization(epsilon=1e-6)
        self.mlp = keras.Sequential(
            [
                layers.Dense(units=self.dimensions, activation=keras.activations.gelu),
                layers.Dropout(self.mlp_dropout),
                layers.Dense(units=self.dimensions, activation=keras.activations.gelu),
            ]
        )
        self.dense = layers.Dense(units=self.num_classes)
        self.flatten = layers.Flatten()

    def call(self, x):
        batch_size = ops.shape(x)[0]
        class_token = ops.repeat(self.cls, repeats=batch_size, axis=0)
        x = ops.concatenate([class_token, x], axis=1)
        x = self.layer_norm1(x)
        x, viz_weights = self.attention(
            query=x[:, 0:1], key=x, value=x, return_attention_scores=True
        )
        class_token = class_token + x
        class_token = self.layer_norm2(class_token)
        class_token = self.flatten(class_token)
        class_token = self.layer_norm3(class_token)
        class_token = class_token + self.mlp(class_token)
        logits = self.dense(class_token)
        return logits, ops.squeeze(viz_weights)[..., 1:]


class PatchConvNet(keras.Model):
    def __init__(self, stem, trunk, attention_pooling, **kwargs):
        super().__init__(**kwargs)
        self.stem = stem
        self.trunk = trunk
        self.attention_pooling = attention_pooling

    def call(self, images, training=None):
        x = self.stem(images, training=training)
        x = self.trunk(x, training=training)
        logits, viz_weights = self.attention_pooling(x, training=training)
        return logits, viz_weights


def patch_convnet(num_classes, dimensions, depth, ratio, *, tie=True, attention_dropout=0.2,
                  mlp_dropout=0.2):
    """The tutorial's PatchConvNet (without its preprocessing): images -> (logits, viz weights)."""
    return PatchConvNet(
        build_convolutional_stem(dimensions),
        Trunk(depth=depth, dimensions=dimensions, ratio=ratio, tie=tie),
        AttentionPooling(dimensions, num_classes, attention_dropout, mlp_dropout),
    )


# ---------------------------------------------------------------------------------------------
# EANet and the ViT baseline (keras-io examples/vision/eanet)
# ---------------------------------------------------------------------------------------------


class PatchExtract(layers.Layer):
    def __init__(self, patch_size, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = patch_size

    def call(self, x):
        B, C = ops.shape(x)[0], ops.shape(x)[-1]
        x = ops.image.extract_patches(x, self.patch_size)
        x = ops.reshape(x, (B, -1, self.patch_size * self.patch_size * C))
        return x


class PatchEmbedding(layers.Layer):
    def __init__(self, num_patch, embed_dim, **kwargs):
        super().__init__(**kwargs)
        self.num_patch = num_patch
        self.proj = layers.Dense(embed_dim)
        self.pos_embed = layers.Embedding(input_dim=num_patch, output_dim=embed_dim)

    def call(self, patch):
        pos = ops.arange(start=0, stop=self.num_patch, step=1)
        return self.proj(patch) + self.pos_embed(pos)


def external_attention(x, dim, num_heads, dim_coefficient=4, attention_dropout=0,
                       projection_dropout=0, record=None):
    _, num_patch, channel = x.shape
    assert dim % num_heads == 0
    num_heads = num_heads * dim_coefficient

    record["expand"] = layers.Dense(dim * dim_coefficient)
    x = record["expand"](x)
    # create tensor [batch_size, num_patches, num_heads, dim*dim_coefficient//num_heads]
    x = ops.reshape(x, (-1, num_patch, num_heads, dim * dim_coefficient // num_heads))
    x = ops.transpose(x, axes=[0, 2, 1, 3])
    # a linear layer M_k
    record["memory_key"] = layers.Dense(dim // dim_coefficient)
    attn = record["memory_key"](x)
    # normalize attention map
    attn = layers.Softmax(axis=2)(attn)
    # double-normalization
    attn = layers.Lambda(
        lambda attn: ops.divide(
            attn,
            ops.convert_to_tensor(1e-9) + ops.sum(attn, axis=-1, keepdims=True),
        )
    )(attn)
    attn = layers.Dropout(attention_dropout)(attn)
    # a linear layer M_v
    record["memory_value"] = layers.Dense(dim * dim_coefficient // num_heads)
    x = record["memory_value"](attn)
    x = ops.transpose(x, axes=[0, 2, 1, 3])
    x = ops.reshape(x, [-1, num_patch, dim * dim_coefficient])
    # a linear layer to project original dim
    record["out"] = layers.Dense(dim)
    x = record["out"](x)
    x = layers.Dropout(projection_dropout)(x)
    return x


def mlp(x, embedding_dim, mlp_dim, drop_rate=0.2, gelu_approximate=True, record=None):
    gelu = functools.partial(ops.gelu, approximate=gelu_approximate)
    record["mlp"] = (layers.Dense(mlp_dim, activation=gelu), layers.Dense(embedding_dim))
    x = record["mlp"][0](x)
    x = layers.Dropout(drop_rate)(x)
    x = record["mlp"][1](x)
    x = layers.Dropout(drop_rate)(x)
    return x


def transformer_encoder(x, embedding_dim, mlp_dim, num_heads, dim_coefficient, attention_dropout,
                        projection_dropout, attention_type="external_attention",
                        gelu_approximate=True, record=None):
    residual_1 = x
    record["norm1"] = layers.LayerNormalization(epsilon=1e-5)
    x = record["norm1"](x)
    if attention_type == "external_attention":
        x = external_attention(x, embedding_dim, num_heads, dim_coefficient, attention_dropout,
                               projection_dropout, record=record)
    elif attention_type == "self_attention":
        record["attention"] = layers.MultiHeadAttention(
            num_heads=num_heads, key_dim=embedding_dim, dropout=attention_dropout
        )
        x = record["attention"](x, x)
    x = layers.add([x, residual_1])
    residual_2 = x
    record["norm2"] = layers.LayerNormalization(epsilon=1e-5)
    x = record["norm2"](x)
    x = mlp(x, embedding_dim, mlp_dim, drop_rate=projection_dropout,
            gelu_approximate=gelu_approximate, record=record)
    x = layers.add([x, residual_2])
    return x


def eanet(attention_type="external_attention", *, input_shape=(32, 32, 3), num_classes=100,
          patch_size=2, embedding_dim=64, mlp_dim=64, num_heads=4, dim_coefficient=4,
          num_transformer_blocks=8, attention_dropout=0.2, projection_dropout=0.2,
          gelu_approximate=True, logits=False, record=None):
    """The tutorial's `get_model` without its augmentation: images -> class probabilities (or
    logits). `record`, a dict, receives the layers holding weights."""
    record = {} if record is None else record
    num_patches = (input_shape[0] // patch_size) ** 2
    inputs = layers.Input(shape=input_shape)
    x = PatchExtract(patch_size)(inputs)
    record["embedding"] = PatchEmbedding(num_patches, embedding_dim)
    x = record["embedding"](x)
    record["blocks"] = []
    for _ in range(num_transformer_blocks):
        record["blocks"].append({})
        x = transformer_encoder(x, embedding_dim, mlp_dim, num_heads, dim_coefficient,
                                attention_dropout, projection_dropout, attention_type,
                                gelu_approximate, record=record["blocks"][-1])
    x = layers.GlobalAveragePooling1D()(x)
    record["head"] = layers.Dense(num_classes, activation=None if logits else "softmax")
    outputs = record["head"](x)
    return keras.Model(inputs=inputs, outputs=outputs)

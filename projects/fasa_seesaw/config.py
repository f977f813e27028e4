# Copyright (c) fasa_seesaw contributors.
import copy

from detectron2.config import CfgNode as CN

from .errors import ConfigError


def add_fasa_seesaw_config(cfg):
    """
    Add the keys of this project: the box predictor's under MODEL.ROI_BOX_HEAD (CLS_LOSS,
    NORMED_CLASSIFIER, NORM_TEMP), the normed mask head's under MODEL.ROI_MASK_HEAD (NORM_TEMP),
    the methods' under MODEL.SEESAW, MODEL.EQL, MODEL.EQLV2 and MODEL.FASA, LVIS evaluation
    under TEST.LVIS and the rest under FASA_SEESAW. No core detectron2 key changes meaning.
    """
    _C = cfg

    # Classification loss of the box predictor of LongTailROIHeads / LongTailCascadeROIHeads:
    # "softmax_ce", "sigmoid_ce", "federated" (detectron2's), "seesaw", "eql", "eqlv2", or
    # "auto": the ROI head's default (Seesaw for SeesawROIHeads), else detectron2's as
    # USE_SIGMOID_CE and USE_FED_LOSS select it.
    _C.MODEL.ROI_BOX_HEAD.CLS_LOSS = "auto"
    # Cosine (normalised) classifier for all outputs of the box predictor, as in the Seesaw
    # recipe; False: detectron2's linear classifier.
    _C.MODEL.ROI_BOX_HEAD.NORMED_CLASSIFIER = False
    # Temperature (scale) of the cosine classifier.
    _C.MODEL.ROI_BOX_HEAD.NORM_TEMP = 20.0
    # Dual-head classification (Seesaw supplement 4.2), a second training stage: a new classifier
    # beside each box predictor's (every cascade stage), of the same kind and loss, trained from
    # MODEL.WEIGHTS (the trained model) with the rest of the model frozen; at test the two
    # classifiers' scores are averaged. The stage's sampler and schedule are the config's own
    # (the Seesaw entry: RFS, 1x).
    _C.MODEL.ROI_BOX_HEAD.DUAL_HEAD = CN()
    _C.MODEL.ROI_BOX_HEAD.DUAL_HEAD.ENABLED = False
    # Temperature of the cosine 1x1 mask predictor of NormedMaskRCNNConvUpsampleHead ("Norm Mask").
    _C.MODEL.ROI_MASK_HEAD.NORM_TEMP = 20.0
    # Cascade heads (LongTailCascadeROIHeads): detectron2's cascade by default; the values in
    # the comments are mmdetection's Cascade Mask R-CNN (configs/.../mmdet_converted).
    # Test-time class scores: "probs", the mean of the stages' probabilities, or "logits", the
    # mean of the stages' logits through the last predictor's activation (mmdetection).
    _C.MODEL.ROI_BOX_CASCADE_HEAD.SCORE_AVERAGE = "probs"
    # "one" mask head trained on the first stage's RoIs, or "per_stage" (mmdetection): a head per
    # stage trained on that stage's RoIs, their mask probabilities averaged at test.
    # "last" (HTC-Lite): one mask head, trained on the last stage's RoIs (with stage weights, its
    # loss weighted by their sum, as mmdetection's SCNet).
    _C.MODEL.ROI_BOX_CASCADE_HEAD.MASK_HEADS = "one"
    # [] adds the stages' losses and scales the pooled features' gradient by 1/stages; one weight
    # per stage multiplies its box and mask losses instead (mmdetection: [1.0, 0.5, 0.25]).
    _C.MODEL.ROI_BOX_CASCADE_HEAD.STAGE_LOSS_WEIGHTS = []
    # HTC-Lite's global context encoder (Seesaw supplement 4.1) in LongTailCascadeROIHeads: a
    # vector per image from convolutions and global average pooling of a pyramid level, trained
    # to predict the image's categories (binary cross-entropy) and added to every pooled RoI
    # feature of the box and mask heads. Defaults: mmdetection's GlobalContextHead as SCNet
    # configures it (the paper gives no values).
    _C.MODEL.GLOBAL_CONTEXT = CN()
    _C.MODEL.GLOBAL_CONTEXT.ENABLED = False
    # Pyramid level(s) read; with several, the shared convs run on each and the vectors are
    # averaged. mmdetection reads the coarsest (feats[-1], P6 of its 5-level FPN).
    _C.MODEL.GLOBAL_CONTEXT.IN_FEATURES = ["p6"]
    # 3x3 convolutions before the pooling; with RESIDUAL, grouped two by two into residual blocks
    # (mmdetection's conv_to_res, SimplifiedBasicBlock).
    _C.MODEL.GLOBAL_CONTEXT.NUM_CONVS = 4
    _C.MODEL.GLOBAL_CONTEXT.CONV_DIM = 256
    _C.MODEL.GLOBAL_CONTEXT.RESIDUAL = True
    # Norm of the convolutions ("" = none, as mmdetection's; or detectron2's "BN", "SyncBN",
    # "FrozenBN", "GN", "nnSyncBN", "naiveSyncBN", "LN").
    _C.MODEL.GLOBAL_CONTEXT.NORM = ""
    _C.MODEL.GLOBAL_CONTEXT.LOSS_WEIGHT = 3.0
    # "federated" (LVIS): positives are the image's ground-truth categories, negatives its
    # neg_category_ids, the rest not in the loss (needs MODEL.META_ARCHITECTURE
    # "GlobalContextRCNN"); "exhaustive" (mmdetection's, for COCO-like data): every category
    # without a box is a negative.
    _C.MODEL.GLOBAL_CONTEXT.TARGET = "federated"
    # Image resize of the data mappers: "pil" (detectron2's ResizeShortestEdge: PIL bilinear,
    # antialiased when shrinking) or "cv2" (mmdetection's Resize: OpenCV bilinear and mmcv's
    # size rule, which is one pixel off detectron2's for some shapes).
    _C.INPUT.RESIZE_BACKEND = "pil"

    # NMS re-sampling (Forest R-CNN; FASA supplement Table 8) in the training-time NMS of the RPN
    # (MODEL.PROPOSAL_GENERATOR.NAME "LongTailRPN"): a proposal near a rare object survives NMS
    # up to a higher IoU than one near a frequent object. Test-time NMS stays MODEL.RPN.NMS_THRESH.
    _C.MODEL.RPN.NMS_RESAMPLING = CN()
    _C.MODEL.RPN.NMS_RESAMPLING.ENABLED = False
    # "discrete" (the official LVIS configs: one NMS per group, each keeping the survivors near
    # that group's ground truth; the frequent pass keeps those near no rare or common one) or
    # "matched" (each proposal takes the group of the ground truth it overlaps most, and one NMS
    # runs with each kept proposal's own threshold).
    _C.MODEL.RPN.NMS_RESAMPLING.MODE = "discrete"
    # NMS IoU thresholds for proposals of rare, common and frequent classes; proposals on no
    # object use the frequent one.
    _C.MODEL.RPN.NMS_RESAMPLING.THRESHOLDS = [0.9, 0.8, 0.7]
    # IoU with a ground-truth box from which a proposal belongs to that box's group.
    _C.MODEL.RPN.NMS_RESAMPLING.MATCH_IOU = 0.3

    _C.MODEL.SEESAW = CN()
    # Mitigation exponent p: M_ij = (N_j / N_i)^p when N_j < N_i. 0 switches mitigation off.
    _C.MODEL.SEESAW.P = 0.8
    # Compensation exponent q: C_ij = (sigma_j / sigma_i)^q when sigma_j > sigma_i.
    # 0 switches compensation off.
    _C.MODEL.SEESAW.Q = 2.0
    # Lower clamp of the ground-truth class probability sigma_i in the compensation factor.
    _C.MODEL.SEESAW.EPS = 0.01
    # Weight of the Seesaw class loss (foreground RoIs, divided by the number of sampled RoIs).
    _C.MODEL.SEESAW.LOSS_WEIGHT = 1.0
    # Weight of the 2-way objectness loss (all sampled RoIs).
    _C.MODEL.SEESAW.OBJECTNESS_LOSS_WEIGHT = 1.0
    # Sum the per-class foreground counts over all processes (True), or keep them per process
    # as the mmdetection reference does (False).
    _C.MODEL.SEESAW.SYNC_COUNTS = True

    _C.MODEL.EQL = CN()
    # Equalization Loss (CLS_LOSS "eql"). Tail threshold lambda: a foreground RoI ignores the
    # negative terms of classes whose image frequency (images with the class / images with any
    # annotation, from DATASETS.TRAIN) is < LAMBDA. 0.0011: the official LVIS v1 config (EQLv2
    # repository); 0.00177: the paper's LVIS v0.5 value.
    _C.MODEL.EQL.LAMBDA = 0.0011
    # Weight of the EQL class loss (summed over classes, divided by the number of sampled RoIs).
    _C.MODEL.EQL.LOSS_WEIGHT = 1.0
    # Initial sigmoid probability of every class: classifier bias -log((1 - p) / p), as the
    # official code initialises it (0.5 gives detectron2's zero bias).
    _C.MODEL.EQL.PRIOR_PROB = 0.001

    _C.MODEL.EQLV2 = CN()
    # Equalization Loss v2 (CLS_LOSS "eqlv2"): negative weight q_j = f(pos_j / neg_j) with
    # f(x) = 1 / (1 + exp(-GAMMA (x - MU))), positive weight 1 + ALPHA (1 - q_j). The paper's and
    # the official code's values.
    _C.MODEL.EQLV2.GAMMA = 12.0
    _C.MODEL.EQLV2.MU = 0.8
    _C.MODEL.EQLV2.ALPHA = 4.0
    # Weight of the EQLv2 loss (classes and objectness logit, divided by the number of RoIs).
    _C.MODEL.EQLV2.LOSS_WEIGHT = 1.0
    # Initial sigmoid probability of every logit (classifier bias), as the official code.
    _C.MODEL.EQLV2.PRIOR_PROB = 0.001
    # Test-time class scores multiplied by (1 - sigmoid(objectness logit)) (official default).
    _C.MODEL.EQLV2.TEST_WITH_OBJ = True
    # Sum each step's gradient statistics over all processes (True, as the official code), or
    # keep them per process (False).
    _C.MODEL.EQLV2.SYNC_STATS = True

    _C.MODEL.FASA = CN()
    # Feature Augmentation and Sampling Adaptation, with any CLS_LOSS. Needs ROI_HEADS.NAME
    # LongTailROIHeads or LongTailCascadeROIHeads (or one of their aliases).
    _C.MODEL.FASA.ENABLED = False
    # Weight of the virtual features' classification loss.
    _C.MODEL.FASA.LOSS_WEIGHT = 0.1
    # Virtual features drawn for each class that is drawn.
    _C.MODEL.FASA.SAMPLES_PER_CLASS = 1
    # Clamp virtual features at 0, since the real ones come out of a ReLU.
    _C.MODEL.FASA.CLAMP_MIN_ZERO = False
    # Iterations with statistics only, before virtual features start; -1: one epoch of the
    # training set at SOLVER.IMS_PER_BATCH.
    _C.MODEL.FASA.WARMUP_ITERS = -1
    # Feature bank: "ema" (the reference's running averages) or "exact" (cumulative mean and
    # variance of all positive features, Chan et al.'s parallel update).
    _C.MODEL.FASA.BANK_MODE = "ema"
    # EMA momentum: mu <- m * batch_mean + (1 - m) * mu.
    _C.MODEL.FASA.BANK_MOMENTUM = 0.1
    # Bank variance: "sample" (the reference: squared deviations / (n - 1), n > 1) or
    # "population" (/ n: narrower virtual features for classes seen a few times per batch).
    _C.MODEL.FASA.BANK_VARIANCE = "sample"
    # All-reduce bank statistics so every process holds the same bank; False: one bank per
    # process from its own RoIs, as the reference keeps one per GPU.
    _C.MODEL.FASA.SYNC_BANK = True
    # Initial draw probabilities: "inverse_frequency" (training instance counts) or "uniform".
    _C.MODEL.FASA.INIT_PROBS = "inverse_frequency"
    # How a drawn class's virtual feature is made: "gaussian" (FASA's: N(mean_c, var_c) from the
    # bank), "smote" (an interpolation of two stored features of the class and a cosine
    # neighbour) or "moex" (a stored feature of the class with the channel mean and std of a
    # stored feature of another class, labels mixed). FASA supplement section F; docs/fasa.md.
    _C.MODEL.FASA.AUGMENTATION = "gaussian"
    # SMOTE and MoEx: real positive classifier-input features kept per class (a ring buffer of
    # C x FEATURE_MEMORY x D floats: 79 MB at LVIS's 1203 classes x 1024-d for 16). Unused by
    # "gaussian". SMOTE needs >= 2; 16 leaves 15 candidates for its 5 neighbours.
    _C.MODEL.FASA.FEATURE_MEMORY = 16
    # SMOTE: nearest neighbours (cosine) among the class's stored features; the supplement's 5.
    _C.MODEL.FASA.SMOTE_K = 5
    # MoEx: loss = LAMBDA * L(x_hat, c) + (1 - LAMBDA) * L(x_hat, y_B); 0.9 as MoEx's ImageNet
    # recipe (the supplement does not give it).
    _C.MODEL.FASA.MOEX_LAMBDA = 0.9
    # MoEx: probability that a step's virtual features are moment-exchanged (else the stored
    # features themselves, label c); the supplement's 1.0.
    _C.MODEL.FASA.MOEX_PROB = 1.0
    # MoEx: epsilon added to the variance of a feature's channels; the supplement's 1e-5.
    _C.MODEL.FASA.MOEX_EPS = 1e-5

    _C.MODEL.FASA.ADAPT = CN()
    # Adapt the draw probabilities from a validation-loss pass (FASAAdaptationHook).
    _C.MODEL.FASA.ADAPT.ENABLED = True
    # Iterations between passes; -1: one epoch of the training set.
    _C.MODEL.FASA.ADAPT.PERIOD = -1
    # Registered dataset for the pass. "": carve HELDOUT_FRACTION of DATASETS.TRAIN out of
    # training (the default: adapting on the evaluation split, as the reference does, leaks it).
    _C.MODEL.FASA.ADAPT.HELDOUT_DATASET = ""
    # Held-out images with the training augmentations (random scale, flip), as the reference's
    # pass; False: test-size, un-augmented, so passes differ only by the model.
    _C.MODEL.FASA.ADAPT.AUGMENT = False
    # Fraction of training images held out when carving, chosen by hashing (SEED, image id).
    _C.MODEL.FASA.ADAPT.HELDOUT_FRACTION = 0.1
    # Seed of the held-out carve, of AffinityPropagation ("affinity") and of AUGMENT's
    # per-pass draws ("affinity_reference" always uses the official random_state 1).
    _C.MODEL.FASA.ADAPT.SEED = 0
    # Class grouping: "meanshift" (the paper's), "affinity" (AffinityPropagation given
    # similarities, as it expects), "affinity_reference" (the official code's call: given squared
    # distances of all classes' means) or "none" (class-wise).
    _C.MODEL.FASA.ADAPT.CLUSTERING = "meanshift"
    # MeanShift bandwidth: > 0 a fixed value; 0 the BANDWIDTH_QUANTILE below.
    _C.MODEL.FASA.ADAPT.BANDWIDTH = 0.0
    # Quantile of the pairwise distances between the seen classes' bank means (scale-free);
    # 0.05 was chosen on the study's val split (docs/fasa.md).
    _C.MODEL.FASA.ADAPT.BANDWIDTH_QUANTILE = 0.05
    # AffinityPropagation damping in [0.5, 1) for CLUSTERING "affinity"; raise it when it does not
    # converge (a non-converged pass falls back to class-wise groups with a warning).
    _C.MODEL.FASA.ADAPT.AFFINITY_DAMPING = 0.5
    # A group's loss: "reference" (per-class loss sums / all sampled RoIs of the pass, background
    # included, summed over the group: moves with the foreground share of the RoIs) or
    # "mean_per_roi" (the group's mean loss per foreground RoI: insensitive to that share).
    _C.MODEL.FASA.ADAPT.GROUP_SIGNAL = "reference"
    # Adaptation signal: "loss" (per-class validation classification loss, cheap) or "metric"
    # (per-category box AP from inference + LVIS evaluation on the held-out set; supplement
    # Table 3: slightly better, much more costly; groups compare their mean AP).
    _C.MODEL.FASA.ADAPT.SIGNAL = "loss"
    # p *= UP_FACTOR for a group whose validation loss fell, p *= DOWN_FACTOR for one whose
    # loss rose.
    _C.MODEL.FASA.ADAPT.UP_FACTOR = 1.1
    _C.MODEL.FASA.ADAPT.DOWN_FACTOR = 0.9

    # LVIS evaluation of train_net.py (fasa_seesaw.evaluation).
    _C.TEST.LVIS = CN()
    # "hotcoco" (fast, Rust) or "lvis" (the official lvis-api); they give the same numbers.
    _C.TEST.LVIS.ENGINE = "hotcoco"
    # Extra metrics besides LVIS AP: any of "fixed" (AP-Fixed), "pool" (AP-Pool), "tide".
    _C.TEST.LVIS.EXTRAS = []
    # K of AP-Fixed and AP-Pool: detections kept per class over the dataset.
    _C.TEST.LVIS.FIXED_K = 10000
    # > 0: keep only the top K results per class while collecting predictions (memory bounded
    # by K x classes), lifting the per-image cap (see TOPK_MAX_PER_IMAGE) and dropping what can
    # no longer enter a class's top K; for AP-Fixed, pair it with a low
    # MODEL.ROI_HEADS.SCORE_THRESH_TEST (e.g. 0.0001) and TOPK_PER_CLASS >= FIXED_K.
    _C.TEST.LVIS.TOPK_PER_CLASS = 0
    # In that mode, the most detections kept per image (-1: no cap). It bounds the memory of the
    # first images, before the per-class floors rise: the mask head predicts N x classes x 28 x
    # 28 logits for N detections (1000 x 1203 classes: 3.8 GB in fp32).
    _C.TEST.LVIS.TOPK_MAX_PER_IMAGE = 1000
    # Write per_category_ap_<task>.png next to the CSV.
    _C.TEST.LVIS.FIGURES = True

    _C.FASA_SEESAW = CN()
    # Print a one-line progress report with an ETA every this many iterations (0: off).
    _C.FASA_SEESAW.PROGRESS_PERIOD = 20
    # Fail early when MODEL.ROI_HEADS.NUM_CLASSES disagrees with the training dataset's categories.
    _C.FASA_SEESAW.CHECK_NUM_CLASSES = True
    # Train on the images FASA would train on (DATASETS.TRAIN minus the held-out part carved with
    # MODEL.FASA.ADAPT.HELDOUT_FRACTION and SEED) without FASA: the control that tells a FASA
    # difference from a difference in training data. Ignored when FASA carves its own split.
    _C.FASA_SEESAW.HOLD_OUT_FASA_SPLIT = False

    _C.FASA_SEESAW.GRAD_STATS = CN()
    # Accumulate per-category positive and negative gradients on the class logits during
    # training (Seesaw supplement Figure A1) and write OUTPUT_DIR/grad_stats.csv and
    # grad_ratio.png at the end (fasa_seesaw.engine.grad_stats.GradientStatsHook).
    _C.FASA_SEESAW.GRAD_STATS.ENABLED = False


# Keys that moved, old -> new: an old key in a config file or on the command line is an error
# that names the new one (see merge_config).
RENAMED_KEYS = {
    "MODEL.SEESAW.NORMED_CLASSIFIER": "MODEL.ROI_BOX_HEAD.NORMED_CLASSIFIER",
    "MODEL.SEESAW.TEMPERATURE": "MODEL.ROI_BOX_HEAD.NORM_TEMP",
    "MODEL.NORMED_MASK_HEAD.TEMPERATURE": "MODEL.ROI_MASK_HEAD.NORM_TEMP",
    "MODEL.FASA.SYNC": "MODEL.FASA.SYNC_BANK",
    "MODEL.FASA.ADAPT.UP": "MODEL.FASA.ADAPT.UP_FACTOR",
    "MODEL.FASA.ADAPT.DOWN": "MODEL.FASA.ADAPT.DOWN_FACTOR",
    "FASA_SEESAW.EVAL.ENGINE": "TEST.LVIS.ENGINE",
    "FASA_SEESAW.EVAL.EXTRAS": "TEST.LVIS.EXTRAS",
    "FASA_SEESAW.EVAL.FIXED_K": "TEST.LVIS.FIXED_K",
    "FASA_SEESAW.EVAL.TOPK_PER_CLASS": "TEST.LVIS.TOPK_PER_CLASS",
    "FASA_SEESAW.EVAL.TOPK_MAX_PER_IMAGE": "TEST.LVIS.TOPK_MAX_PER_IMAGE",
    "FASA_SEESAW.EVAL.FIGURES": "TEST.LVIS.FIGURES",
}
_RENAMED_GROUPS = {"MODEL.NORMED_MASK_HEAD": "MODEL.ROI_MASK_HEAD", "FASA_SEESAW.EVAL": "TEST.LVIS"}


def _renamed_error(key: str, source: str) -> ConfigError:
    new = RENAMED_KEYS.get(key) or _RENAMED_GROUPS.get(key)
    note = ""
    if key == "MODEL.SEESAW.NORMED_CLASSIFIER":
        note = (
            " Its default is now False (detectron2's linear classifier); the Seesaw configs set "
            "it True, and SeesawROIHeads / SeesawCascadeROIHeads always use the cosine classifier."
        )
    return ConfigError(
        f"{key} ({source}) was renamed {new}; use the new key.{note} A config.yaml saved by an "
        "earlier version converts with: python -m fasa_seesaw.config_upgrade OLD.yaml NEW.yaml"
    )


def _flat_keys(d: dict, prefix: str = ""):
    for k, v in d.items():
        key = prefix + str(k)
        yield key
        if isinstance(v, dict):
            yield from _flat_keys(v, key + ".")


def merge_config(cfg, config_file: str = "", opts=()):
    """
    ``cfg.merge_from_file(config_file)`` then ``cfg.merge_from_list(opts)``, with a ConfigError
    naming the new key when a renamed key is used, instead of detectron2's KeyError.
    """
    if config_file:
        data = cfg.load_yaml_with_base(config_file, allow_unsafe=True)
        for key in _flat_keys(data):
            if key in RENAMED_KEYS or key in _RENAMED_GROUPS:
                raise _renamed_error(key, f"in {config_file}")
        cfg.merge_from_file(config_file)
    for key in list(opts)[0::2]:
        if key in RENAMED_KEYS:
            raise _renamed_error(key, "on the command line")
    cfg.merge_from_list(list(opts))
    return cfg


# The Seesaw heads that read MODEL.SEESAW.NORMED_CLASSIFIER, and the heads that build the same
# model whatever the classifier.
_OLD_SEESAW_HEADS = {
    "SeesawROIHeads": "LongTailROIHeads",
    "SeesawCascadeROIHeads": "LongTailCascadeROIHeads",
}


def upgrade_config_dict(data: dict) -> dict:
    """
    A config as a nested dict (e.g. a run's saved config.yaml) with the keys of
    :data:`RENAMED_KEYS` under their new names; ``data`` is not changed. The old
    MODEL.SEESAW.NORMED_CLASSIFIER only acted on the Seesaw heads, so it becomes False for others;
    a Seesaw head with it False becomes LongTailROIHeads (or the cascade twin) with CLS_LOSS
    seesaw, since the Seesaw heads now always use the cosine classifier.
    """
    data = copy.deepcopy(data)
    missing = object()

    def pop(key):
        *parents, leaf = key.split(".")
        node = data
        for name in parents:
            node = node.get(name) if isinstance(node, dict) else None
        return node.pop(leaf, missing) if isinstance(node, dict) else missing

    def put(key, value):
        *parents, leaf = key.split(".")
        node = data
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value

    head = data.get("MODEL", {}).get("ROI_HEADS", {}).get("NAME")
    for old, new in RENAMED_KEYS.items():
        value = pop(old)
        if value is missing:
            continue
        if old == "MODEL.SEESAW.NORMED_CLASSIFIER":
            if head not in _OLD_SEESAW_HEADS:
                value = False
            elif not value:
                # The Seesaw heads now always use the cosine classifier: the same model with a
                # linear one is LongTailROIHeads with CLS_LOSS seesaw.
                put("MODEL.ROI_HEADS.NAME", _OLD_SEESAW_HEADS[head])
                put("MODEL.ROI_BOX_HEAD.CLS_LOSS", "seesaw")
        put(new, value)
    for group in _RENAMED_GROUPS:  # emptied by the moves
        rest = pop(group)
        if rest not in (missing, {}):
            put(group, rest)  # keys that never existed: the merge refuses them
    return data

"""The poster's loss terms, one file each, as pure functions of features, logits and targets.

    T_i2p, T_t2p            transport_plans.py   transport_assignments
    L_code = L_t2p + L_i2p  code_loss.py         loss_code (code_logits, code_probabilities)
    L_ot                    ot_loss.py           loss_ot
    L_align (i2t, t2i,      alignment.py         distilled_alignment (clip_alignment without a teacher),
             i2i, t2t)                           soft_cross_entropy, positive_targets
    L_itm                   itm.py               image_text_matching (hard negatives: sample_hard_negatives)
    L_mlm                   mlm.py               masked_language_modelling (mlm_loss_from_logits)

None of them knows an encoder, so each can be checked on hand-made tensors (tests/test_losses.py,
tests/test_codebook.py). `codis_lib.codebook.codebook_losses` puts the three codebook terms together and
`CODIS.forward` (codis_lib/model/codis.py) encodes, calls them and adds the weighted results.
docs/METHOD.md's first table maps each term to its function, notebook section and test.
"""

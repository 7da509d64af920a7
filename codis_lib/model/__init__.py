"""The CODIS model: ViT image encoder, BERT text + fusion encoder, momentum teacher, queues and codebook."""

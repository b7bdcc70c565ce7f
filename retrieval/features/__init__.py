"""The networks: torchvision AlexNet and VGG16, their weights, the fc6/fc7 extractor, layer tables and batch sizes."""

#!/usr/bin/env bash
# The MNIST grid: LeNet with the CIFAR-10 recipe's optimisation (SGD lr 0.1, momentum 0.9, weight decay
# 1e-4, lr x0.1 every 30 of 90 epochs, batch 400); RS and IDRS r = 0.01, k = 20 at sigma_b 0.12 / 0.25 /
# 0.5, then certify every 20th test image at n = 100,000. Resumable. E.g.: DATA=~/data bash scripts/reproduce_mnist.sh
exec bash "$(dirname "$0")/reproduce.sh" mnist

"""`make gpu-check`: the real-size models of both real chains with random weights on generated data in the real
formats (COCO-size JPEGs in the VQA v2 layout, miniImageNet pickles), nothing downloaded, section by section, then the
projected time, disk and memory of every stage at its configured budget. `--quick` runs every section at tiny counts
on a CPU (CI). See `metadiff.bench.gpu_check.__main__` for the sections."""

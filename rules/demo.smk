rule demo_checkpoint:
    """Train the demo model of demo.kind with real DeepSpeed (CPU processes) and save its checkpoint."""
    output:
        latest=f"{SETTINGS.demo_folder}/latest",
    log:
        job=f"{LOGS}/demo_checkpoint.log",
        # DeepSpeed's launcher and its training processes.
        training=f"{LOGS}/demo_training.log",
    benchmark:
        f"{BENCHMARKS}/demo_checkpoint.tsv"
    conda:
        "../envs/ucpflow.yaml"
    threads: config["demo"]["num_procs"]
    params:
        demo=config["demo"],
    script:
        "../scripts/demo_checkpoint.py"

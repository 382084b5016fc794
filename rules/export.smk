# Exports of the universal checkpoint: `snakemake megatron` (a Megatron-LM checkpoint at target_tp x
# target_pp) and `snakemake hf` (a transformers model folder). A plan checkpoint decides what each
# output file holds; one job writes each file; a finalize job writes the file that marks completion.


include: "export_common.smk"


checkpoint export_megatron_plan:
    """Decide every rank file's tensors and splits; check the target degrees against the model."""
    input:
        params=index_input("params"),
        universal=universal_outputs,
        model_state=universal_model_state,
    output:
        f"{EXPORT}/megatron_plan.json",
    log:
        f"{LOGS}/{{derived}}/export/megatron_plan.log",
    conda:
        "../envs/ucpflow.yaml"
    params:
        universal_folder=universal_folder,
        megatron_folder=lambda wildcards: save_of(wildcards).megatron,
        target_tp=config["target_tp"],
        target_pp=config["target_pp"],
        qkv_layout=config["megatron_qkv_layout"],
    script:
        "../scripts/export_megatron_plan.py"


rule export_megatron_shard:
    """Write one (tp, pp) rank's model_optim_rng.pt from the universal fp32 weights."""
    input:
        plan=work_input("export/megatron_plan.json"),
        weights=megatron_shard_weights,
    output:
        f"{MEGATRON_FOLDER}/iter_{{iteration}}/{{rank}}/model_optim_rng.pt",
    log:
        f"{LOGS}/megatron/{{megatron}}/iter_{{iteration}}/{{rank}}.log",
    wildcard_constraints:
        iteration=r"\d{7}",
        rank=r"mp_rank_\d{2}(_\d{3})?",
    conda:
        "../envs/ucpflow.yaml"
    script:
        "../scripts/export_megatron_shard.py"


rule export_megatron_finalize:
    """Write latest_checkpointed_iteration.txt last: Megatron then finds a complete checkpoint."""
    input:
        plan=work_input("export/megatron_plan.json"),
        shards=megatron_shards,
    output:
        f"{MEGATRON_FOLDER}/latest_checkpointed_iteration.txt",
    log:
        f"{LOGS}/megatron/{{megatron}}/finalize.log",
    conda:
        "../envs/ucpflow.yaml"
    script:
        "../scripts/export_megatron_finalize.py"


rule megatron:
    """Target: a Megatron-LM checkpoint at target_tp x target_pp in megatron_folder."""
    input:
        refuse_unconvertible,
        [f"{save.megatron}/{MEGATRON_TRACKER}" for save in SAVES],
    localrule: True


checkpoint export_hf_plan:
    """Decide the config, tensor names and safetensors files of a transformers, GPT-2 or Llama model.
    A transformers model's plan reads only the index (and the checkpoint's model states), so it runs beside
    the extractions; a Megatron GPT/Llama model's reads the universal output."""
    input:
        unpack(hf_plan_sources),
        layout=index_input("layout"),
        params=index_input("params"),
    output:
        f"{EXPORT}/hf_plan.json",
    log:
        f"{LOGS}/{{derived}}/export/hf_plan.log",
    # Beside the extractions, ahead of them: the export's jobs are known only once it is written.
    priority: 3
    conda:
        "../envs/ucpflow.yaml"
    params:
        universal_folder=universal_folder,
        hf_folder=lambda wildcards: save_of(wildcards).hf,
        max_shard_size=config["hf_max_shard_size"],
        hf_dtype=config["hf_dtype"],
        exclude_frozen=config["hf_exclude_frozen"],
        qkv_layout=config["megatron_qkv_layout"],
    script:
        "../scripts/export_hf_plan.py"


rule export_hf_shard:
    """Write one safetensors file of the transformers model: a transformers model's tensors merged straight
    from the rank files (through the extraction maps), a Megatron model's from the universal output.
    """
    input:
        unpack(hf_shard_sources),
        plan=work_input("export/hf_plan.json"),
    output:
        f"{HF_FOLDER}/{{stem}}.safetensors",
    log:
        f"{LOGS}/hf/{{hf}}/{{stem}}.log",
    wildcard_constraints:
        stem=r"model(-\d{5}-of-\d{5})?",
    priority: 1
    conda:
        "../envs/ucpflow.yaml"
    resources:
        mem_mb=hf_shard_mem_mb,
        runtime=hf_shard_runtime,
    script:
        "../scripts/export_hf_shard.py"


rule export_hf_index:
    """model.safetensors.index.json, when the weights take more than one file."""
    input:
        plan=work_input("export/hf_plan.json"),
    output:
        f"{HF_FOLDER}/model.safetensors.index.json",
    log:
        f"{LOGS}/hf/{{hf}}/index.log",
    conda:
        "../envs/ucpflow.yaml"
    script:
        "../scripts/export_hf_index.py"


rule export_hf_finalize:
    """Write generation_config.json and, last, config.json: transformers then finds a complete model."""
    input:
        plan=work_input("export/hf_plan.json"),
        files=hf_files,
    output:
        generation_config=f"{HF_FOLDER}/generation_config.json",
        config=f"{HF_FOLDER}/config.json",
    log:
        f"{LOGS}/hf/{{hf}}/finalize.log",
    conda:
        "../envs/ucpflow.yaml"
    script:
        "../scripts/export_hf_finalize.py"


rule hf:
    """Target: a transformers model folder (what save_pretrained writes) in hf_folder."""
    input:
        hf_targets,
    localrule: True

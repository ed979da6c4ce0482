# World, base model, preference pairs and latent shards.


rule synthesize:
    output:
        directory(f"{RES}/world"),
    log:
        f"{RES}/logs/synthesize.log",
    benchmark:
        f"{RES}/benchmarks/synthesize.tsv"
    params:
        cmd=stage_cmd("synthesize"),
        section=section("world", "synthesize"),
    conda:
        "../../envs/lpo.yaml"
    shell:
        "{params.cmd} --out {output} > {log} 2>&1"


rule pretrain_base:
    input:
        world=f"{RES}/world",
    output:
        weights=directory(f"{RES}/pretrain/weights"),
        metrics=f"{RES}/pretrain/metrics.json",
    log:
        f"{RES}/logs/pretrain_base.log",
    benchmark:
        f"{RES}/benchmarks/pretrain_base.tsv"
    params:
        cmd=stage_cmd("pretrain", "pretrain_base"),
        section=section("backbone", "pretrain"),
        workdir=lambda wildcards, output: os.path.dirname(output.metrics),
    resources:
        **rule_resources("pretrain_base"),
    conda:
        "../../envs/lpo.yaml"
    shell:
        "{params.cmd} --world {input.world} --out {params.workdir} > {log} 2>&1"


rule base:
    input:
        base_inputs,
    output:
        directory(f"{RES}/base"),
    log:
        f"{RES}/logs/base.log",
    benchmark:
        f"{RES}/benchmarks/base.tsv"
    params:
        cmd=stage_cmd("base"),
        section=section("backbone"),
        weights=lambda wildcards, input: f"--weights {input[0]}" if input else "",
    conda:
        "../../envs/lpo.yaml"
    shell:
        "{params.cmd} --out {output} {params.weights} > {log} 2>&1"


rule download:
    input:
        unpack(download_inputs),
    output:
        directory(f"data/{DATASET}"),
    log:
        f"{RES}/logs/download.log",
    benchmark:
        f"{RES}/benchmarks/download.tsv"
    params:
        cmd=stage_cmd("download"),
        section=section("download", "annotator"),
        base=lambda wildcards, input: f"--base {input.base}" if "base" in input.keys() else "",
    resources:
        **rule_resources("download"),
    conda:
        "../../envs/lpo.yaml"
    shell:
        "{params.cmd} --out {output} {params.base} > {log} 2>&1"


rule precompute_latents:
    input:
        data=f"data/{DATASET}",
        base=f"{RES}/base",
    output:
        directory(f"{RES}/latents"),
    log:
        f"{RES}/logs/precompute_latents.log",
    benchmark:
        f"{RES}/benchmarks/precompute_latents.tsv"
    params:
        cmd=stage_cmd("latents", "precompute_latents"),
        section=section("latents"),
    resources:
        **rule_resources("precompute_latents"),
    conda:
        "../../envs/lpo.yaml"
    shell:
        "{params.cmd} --data {input.data} --base {input.base} --out {output} > {log} 2>&1"

# Evaluation of every model on held-out prompts with the same seeds, and the report.


rule evaluate:
    input:
        model=lambda wildcards: policy_dir(wildcards.model),
        base=f"{RES}/base",
        prompts=prompt_source,
        lrm=f"{RES}/lrm/model",
    output:
        metrics=f"{RES}/eval/{{model}}/metrics.json",
        per_prompt=f"{RES}/eval/{{model}}/per_prompt.jsonl",
        samples=f"{RES}/eval/{{model}}/samples.npz",
    log:
        f"{RES}/logs/evaluate_{{model}}.log",
    benchmark:
        f"{RES}/benchmarks/evaluate_{{model}}.tsv"
    params:
        cmd=stage_cmd("evaluate"),
        section=section("evaluate"),
        outdir=lambda wildcards, output: os.path.dirname(output.metrics),
    resources:
        **rule_resources("evaluate"),
    conda:
        "../../envs/lpo.yaml"
    shell:
        "{params.cmd} --model {input.model} --base {input.base} --prompts {input.prompts}"
        " --lrm {input.lrm} --out {params.outdir} > {log} 2>&1"


rule report:
    input:
        unpack(report_inputs),
        samples=expand(f"{RES}/eval/{{model}}/samples.npz", model=MODELS),
    output:
        report=f"{RES}/report.md",
        metrics=report(
            f"{RES}/figures/metrics.png",
            caption="../report/metrics.rst",
            category="Evaluation",
            labels={"figure": "Metrics with 95% intervals"},
        ),
        table=report(
            f"{RES}/figures/metrics_table.png",
            caption="../report/metrics_table.rst",
            category="Evaluation",
            labels={"figure": "Metrics table"},
        ),
        grid=report(
            f"{RES}/figures/grid.png",
            caption="../report/grid.rst",
            category="Evaluation",
            labels={"figure": "Samples: same seed, every model"},
        ),
        curves=report(
            f"{RES}/figures/training_curves.png",
            caption="../report/training_curves.rst",
            category="Training",
            labels={"figure": "Training curves"},
        ),
        compute=report(
            f"{RES}/figures/compute.png",
            caption="../report/compute.rst",
            category="Compute",
            labels={"figure": "Training cost per method"},
        ),
    log:
        f"{RES}/logs/report.log",
    params:
        cmd=stage_cmd("report"),
        res=lambda wildcards, output: os.path.dirname(output.report),
    conda:
        "../../envs/lpo.yaml"
    shell:
        "{params.cmd} --results {params.res} --out {output.report} > {log} 2>&1"

"""Recommend: the next items for every user (the teacher retrieves, DELRec reranks), after the gate."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from delrec.images import cpu_image


@dsl.component(base_image=cpu_image(), packages_to_install=[], install_kfp_package=False)
def recommend(
    evaluate_config: dict,
    dataset: Input[Dataset],
    teacher: Input[Model],
    delrec: Input[Model],
    recommendations: Output[Dataset],
    top_n: int = 10,
    retrieve_k: int = 20,
    destination: str = "",
    pipeline_name: str = "delrec",
    run_id: str = "",
) -> str:
    """Run ``delrec.recommend.recommend`` into the output artifact, with evaluate's LLM settings (backbone,
    device, bf16, batch size, scoring: the model is scored as it was evaluated); with ``destination`` (the
    publish prefix) also upload it to ``<destination>/<pipeline>/recommendations/<run_id>/``. Returns
    that URI (empty without a destination)."""
    from delrec.recommend import RecommendConfig, publish_recommendations
    from delrec.recommend import recommend as run
    from delrec.store import S3Store, local_fingerprint

    stats = run(
        dataset.path,
        teacher.path,
        delrec.path,
        RecommendConfig.from_evaluate(evaluate_config, top_n=top_n, retrieve_k=retrieve_k),
        recommendations.path,
    )
    recommendations.metadata.update(stats)
    recommendations.metadata["content_fingerprint"] = local_fingerprint(recommendations.path)
    if not destination:
        return ""
    store = S3Store.from_env()
    uri = publish_recommendations(store, recommendations.path, destination, pipeline_name, run_id)
    print(f"recommendations for {stats['users']} users: {uri}")
    return uri

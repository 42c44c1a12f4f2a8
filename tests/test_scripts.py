"""A1111 scripts: prompt matrix, X/Y/Z plot (axes, range syntax, S/R), prompts from file, styles.

`fake_generate` returns solid images whose colour encodes the params, so grid tests can check which job
landed in which cell by sampling cell centres.
"""

import random
import zlib

import pytest
from PIL import Image

from booth.errors import BoothError
from booth.generate.params import GenerationParams
from booth.generate.scripts import (
    FIELD_AXES,
    SPECIAL_AXES,
    axis_names,
    expand_range,
    parse_prompt_line,
    prompt_matrix_jobs,
    prompts_from_file_jobs,
    run_prompt_matrix,
    run_prompts_from_file,
    run_xy_grid,
    split_values,
    xy_grid_jobs,
    xyz_grid_jobs,
)

CELL = 48


def color_of(p: GenerationParams) -> tuple[int, int, int]:
    return (p.steps * 5 % 256, int(p.cfg_scale * 20) % 256, zlib.crc32(p.prompt.encode()) % 256)


def fake_generate(p: GenerationParams) -> list[Image.Image]:
    assert p.seed != -1 and p.subseed != -1, "scripts must resolve seeds before calling generate"
    size = (p.width or CELL, p.height or CELL)
    return [Image.new("RGB", size, color_of(p)) for _ in range(p.batch_size * p.n_iter)]


def cell_centre(grid, rows, cols, w, h, r, c):
    left, top = grid.width - cols * w, grid.height - rows * h
    return grid.getpixel((left + c * w + w // 2, top + r * h + h // 2))


def base(**kw) -> GenerationParams:
    return GenerationParams(**{"prompt": "a photo of a dog", "seed": 100, **kw})


# ---------------------------------------------------------------------------------------------- prompt matrix


def test_prompt_matrix_combinations_in_bit_order_with_one_seed():
    jobs = prompt_matrix_jobs(base(prompt="a|b|c"))
    assert [j.prompt for j in jobs] == ["a", "a, b", "a, c", "a, b, c"]
    assert [j.seed for j in jobs] == [100] * 4
    assert all(j.batch_size == 1 and j.n_iter == 1 for j in jobs)


def test_prompt_matrix_options():
    p = base(prompt="a | b | c", negative_prompt="blurry")
    assert [j.seed for j in prompt_matrix_jobs(p, different_seeds=True)] == [100, 101, 102, 103]
    assert [j.prompt for j in prompt_matrix_jobs(p, put_at_start=True)] == ["a", "b, a", "c, a", "b, c, a"]
    assert [j.prompt for j in prompt_matrix_jobs(p, delimiter="space")] == ["a", "a b", "a c", "a b c"]
    neg = prompt_matrix_jobs(base(prompt="cat", negative_prompt="x|y"), prompt_type="negative")
    assert [(j.prompt, j.negative_prompt) for j in neg] == [("cat", "x"), ("cat", "x, y")]


def test_prompt_matrix_random_seed_is_resolved_once():
    jobs = prompt_matrix_jobs(base(prompt="a|b|c", seed=-1), rng=random.Random(1))
    assert len({j.seed for j in jobs}) == 1 and jobs[0].seed >= 0
    jobs = prompt_matrix_jobs(base(prompt="a|b|c", seed=-1), different_seeds=True, rng=random.Random(1))
    assert [j.seed - jobs[0].seed for j in jobs] == [0, 1, 2, 3]


@pytest.mark.parametrize("options", [{"delimiter": "tab"}, {"prompt_type": "both"}])
def test_prompt_matrix_rejects_unknown_options(options):
    with pytest.raises(BoothError, match="valid:"):
        prompt_matrix_jobs(base(prompt="a|b"), **options)


def test_run_prompt_matrix_lays_out_two_to_the_half_rows():
    result = run_prompt_matrix(base(prompt="a|b|c|d"), fake_generate)
    assert len(result.images) == len(result.jobs) == 8
    rows, cols = 2, 4  # rows = 2^((4-1)//2)
    assert result.grid.width == CELL * 3 // 4 + cols * CELL
    for i, job in enumerate(result.jobs):
        assert cell_centre(result.grid, rows, cols, CELL, CELL, i // cols, i % cols) == color_of(job)
    assert result.labels["x"] == ["", "b", "c", "b, c"] and result.labels["y"] == ["", "d"]
    assert result.labels["prompts"][7] == "a, b, c, d"


# ---------------------------------------------------------------------------------------------- values and ranges


@pytest.mark.parametrize(
    ("text", "kind", "expected"),
    [
        ("1-5", int, [1, 2, 3, 4, 5]),
        ("1-5 (+2)", int, [1, 3, 5]),
        ("1-6 (+2)", int, [1, 3, 5]),
        ("1-10 [5]", int, [1, 3, 5, 7, 10]),  # truncated linspace, as A1111
        ("10-1 (-3)", int, [10, 7, 4, 1]),
        ("5-1", int, [5, 4, 3, 2, 1]),
        ("-5--3", int, [-5, -4, -3]),
        ("0.5-1.0 (+0.25)", float, [0.5, 0.75, 1.0]),
        ("0.1-0.4 (+0.1)", float, [0.1, 0.2, 0.3, 0.4]),
        ("1.0-0.5 (-0.25)", float, [1.0, 0.75, 0.5]),
        ("0-1 [3]", float, [0.0, 0.5, 1.0]),
        ("7", int, None),
        ("-1", int, None),
        ("1.5-2", int, None),  # not an int range: left to the value parser, which rejects it
    ],
)
def test_expand_range(text, kind, expected):
    assert expand_range(text, kind) == expected


@pytest.mark.parametrize("text", ["1-5 (-1)", "5-1 (+1)", "1-5 (+0)", "1-5 [0]"])
def test_expand_range_rejects_ranges_that_never_end(text):
    with pytest.raises(ValueError):
        expand_range(text, int)


def test_split_values_handles_quotes():
    assert split_values('dog,  "big, fluffy cat" , wolf') == ["dog", "big, fluffy cat", "wolf"]


# ---------------------------------------------------------------------------------------------- X/Y plot jobs


def test_xy_jobs_grid_values_labels_and_order():
    jobs, xl, yl = xy_grid_jobs(base(), "Steps", "10-30 (+10)", "CFG Scale", "5, 7.5")
    assert xl == ["Steps: 10", "Steps: 20", "Steps: 30"] and yl == ["CFG Scale: 5", "CFG Scale: 7.5"]
    assert [[(j.steps, j.cfg_scale) for j in row] for row in jobs] == [
        [(10, 5.0), (20, 5.0), (30, 5.0)],
        [(10, 7.5), (20, 7.5), (30, 7.5)],
    ]
    assert isinstance(jobs[0][0].steps, int) and isinstance(jobs[0][0].cfg_scale, float)


def test_xy_jobs_random_base_seed_is_shared_by_all_cells():
    jobs, _, _ = xy_grid_jobs(base(seed=-1), "Steps", "1, 2, 3", rng=random.Random(0))
    seeds = {j.seed for row in jobs for j in row}
    assert len(seeds) == 1 and -1 not in seeds


def test_seed_axis_sets_seeds_and_resolves_minus_one():
    jobs, xl, _ = xy_grid_jobs(base(), "Seed", "1-3, -1", rng=random.Random(0))
    seeds = [j.seed for j in jobs[0]]
    assert seeds[:3] == [1, 2, 3] and seeds[3] >= 0 and xl[0] == "Seed: 1"


def test_axes_by_a1111_label_or_field_name():
    jobs, xl, yl = xy_grid_jobs(base(), "sampler", '"Euler a", DDIM', "denoising_strength", "0.3, 0.6")
    assert [j.sampler_name for j in jobs[0]] == ["Euler a", "DDIM"] and xl[0] == "Sampler: Euler a"
    assert [row[0].denoising_strength for row in jobs] == [0.3, 0.6] and yl[0] == "Denoising: 0.3"
    jobs, xl, _ = xy_grid_jobs(base(), "Schedule type", "Karras, Exponential")
    assert [j.scheduler for j in jobs[0]] == ["Karras", "Exponential"]
    jobs, xl, _ = xy_grid_jobs(base(), "dynamic_threshold", "None, 0.995")
    assert [j.dynamic_threshold for j in jobs[0]] == [None, 0.995] and xl == ["dynamic_threshold: None"] + [
        "dynamic_threshold: 0.995"
    ]
    jobs, _, _ = xy_grid_jobs(base(), "img2img_fix_steps", "true, false")
    assert [j.img2img_fix_steps for j in jobs[0]] == [True, False]


def test_size_axis_sets_width_and_height():
    jobs, xl, _ = xy_grid_jobs(base(), "Size", "512x768, 64 x 64")
    assert [(j.width, j.height) for j in jobs[0]] == [(512, 768), (64, 64)]
    assert xl == ["Size: 512x768", "Size: 64x64"]


def test_prompt_sr_replaces_in_prompt_and_negative_prompt():
    p = base(prompt="a dog on a dog bed", negative_prompt="ugly dog")
    jobs, xl, _ = xy_grid_jobs(p, "Prompt S/R", 'dog, "fluffy, cat", ')
    assert xl == ["dog", "fluffy, cat", ""]
    assert [(j.prompt, j.negative_prompt) for j in jobs[0]] == [
        ("a dog on a dog bed", "ugly dog"),
        ("a fluffy, cat on a fluffy, cat bed", "ugly fluffy, cat"),
        ("a  on a  bed", "ugly "),
    ]
    neg_only, _, _ = xy_grid_jobs(base(prompt="cat", negative_prompt="blurry"), "Prompt S/R", "blurry, sharp")
    assert neg_only[0][1].negative_prompt == "sharp"


def test_prompt_sr_search_string_not_found():
    with pytest.raises(BoothError, match="X axis 'Prompt S/R': 'zebra' not found"):
        xy_grid_jobs(base(), "Prompt S/R", "zebra, horse")


def test_prompt_order_permutes_tokens_in_place():
    jobs, xl, _ = xy_grid_jobs(base(prompt="a cat, in snow, oil"), "Prompt order", "cat, oil")
    assert [j.prompt for j in jobs[0]] == ["a cat, in snow, oil", "a oil, in snow, cat"]
    assert xl == ["cat, oil", "oil, cat"]


@pytest.mark.parametrize(
    ("axis", "values", "message"),
    [
        ("Steps", "20, abc", "X axis 'Steps': 'abc' is not an integer"),
        ("Steps", "7.5", "X axis 'Steps': '7.5' is not an integer"),
        ("CFG Scale", "high", "X axis 'CFG Scale': 'high' is not a number"),
        ("Size", "512", "X axis 'Size': '512' is not a size"),
        ("Steps", " , ", "X axis 'Steps': no values"),
        ("Steps", "0, 20", r"cell \[Steps: 0\]: steps must be at least 1"),
        ("Seed", "1-100000", "limit"),
    ],
)
def test_bad_axis_values_are_one_line_booth_errors(axis, values, message):
    with pytest.raises(BoothError, match=message) as info:
        xy_grid_jobs(base(), axis, values)
    assert "\n" not in str(info.value)


def test_axis_names_cover_every_supported_axis():
    assert set(axis_names()) == {*SPECIAL_AXES, *FIELD_AXES}


def test_unknown_axis_lists_valid_names():
    with pytest.raises(
        BoothError,
        match="unknown Y axis 'Stepz'; valid: Nothing, Seed, .*Steps, Hires steps, CFG Scale, Image CFG Scale, Prompt S/R.*Size, Checkpoint name, VAE, Styles, Refiner checkpoint, Refiner switch at, Negative Guidance minimum sigma, Extra noise, or .*cfg_scale",
    ):
        xy_grid_jobs(base(), "Steps", "1", "Stepz", "1")
    with pytest.raises(BoothError, match="unknown X axis 'init_images'"):
        xy_grid_jobs(base(), "init_images", "1")


def test_y_values_without_y_axis_is_an_error():
    with pytest.raises(BoothError, match="without a Y axis"):
        xy_grid_jobs(base(), "Steps", "1", None, "5")


def test_xyz_jobs_apply_all_three_axes():
    jobs, xl, yl, zl = xyz_grid_jobs(base(), "Steps", "1, 2", "CFG Scale", "3", "Sampler", "Euler, DDIM")
    assert [[[(j.steps, j.cfg_scale, j.sampler_name) for j in row] for row in plane] for plane in jobs] == [
        [[(1, 3.0, "Euler"), (2, 3.0, "Euler")]],
        [[(1, 3.0, "DDIM"), (2, 3.0, "DDIM")]],
    ]
    assert zl == ["Sampler: Euler", "Sampler: DDIM"]


# ---------------------------------------------------------------------------------------------- X/Y plot runs


def test_run_xy_grid_places_every_cell():
    result = run_xy_grid(base(), fake_generate, "Steps", "10, 20, 30", "CFG Scale", "4, 8")
    assert len(result.images) == len(result.jobs) == 6
    assert result.grid.width == CELL * 3 // 4 + 3 * CELL  # row labels band + cells
    for r, cfg in enumerate([4.0, 8.0]):
        for c, steps in enumerate([10, 20, 30]):
            expected = color_of(base(steps=steps, cfg_scale=cfg))
            assert cell_centre(result.grid, 2, 3, CELL, CELL, r, c) == expected
    assert result.labels == {
        "x": ["Steps: 10", "Steps: 20", "Steps: 30"],
        "y": ["CFG Scale: 4", "CFG Scale: 8"],
        "z": [""],
    }


def test_run_xy_grid_without_legend_is_exactly_the_cells():
    result = run_xy_grid(base(), fake_generate, "Prompt S/R", "dog, cat", draw_legend=False)
    assert result.grid.size == (2 * CELL, CELL)
    assert result.grid.getpixel((CELL + CELL // 2, CELL // 2)) == color_of(base(prompt="a photo of a cat"))


def test_run_xy_grid_shows_a_batch_as_a_sub_grid():
    result = run_xy_grid(base(batch_size=2, n_iter=2), fake_generate, "Steps", "10, 20", draw_legend=False)
    assert len(result.images) == 8
    assert result.grid.size == (2 * 2 * CELL, 2 * CELL)  # each cell is a 2x2 grid of the job's 4 images
    assert result.grid.getpixel((3 * CELL, CELL)) == color_of(base(steps=20))


def test_run_xy_grid_with_z_axis_puts_sub_grids_side_by_side():
    result = run_xy_grid(base(), fake_generate, "Steps", "10, 20", z_axis="CFG Scale", z_values="4, 8")
    sub_w = CELL * 2
    assert result.grid.width == 2 * sub_w
    bottom = result.grid.height - CELL // 2
    assert result.grid.getpixel((sub_w + CELL // 2, bottom)) == color_of(base(steps=10, cfg_scale=8.0))
    assert result.labels["z"] == ["CFG Scale: 4", "CFG Scale: 8"]


def test_run_checks_the_generate_contract():
    with pytest.raises(RuntimeError, match="returned 0 images"):
        run_xy_grid(base(), lambda p: [], "Steps", "10")


# ---------------------------------------------------------------------------------------------- prompts from file


PROMPTS_FILE = """a cat in a hat

--prompt a dog "in the snow" --negative_prompt blurry, ugly --steps 30 --cfg_scale 5.5 --sampler_name "Euler a"
--width 512 --height 768 --seed 7 --batch_size 2 --n_iter 3 --subseed_strength 0.25
"""


def test_prompts_from_file_parses_plain_and_option_lines():
    jobs = prompts_from_file_jobs(PROMPTS_FILE, base(steps=12, negative_prompt="base neg", prompt=""))
    assert len(jobs) == 3
    assert (jobs[0].prompt, jobs[0].steps, jobs[0].negative_prompt) == ("a cat in a hat", 12, "base neg")
    dog = jobs[1]
    assert (dog.prompt, dog.negative_prompt) == ("a dog in the snow", "blurry, ugly base neg")
    assert (dog.steps, dog.cfg_scale, dog.sampler_name) == (30, 5.5, "Euler a")
    sized = jobs[2]
    assert (sized.prompt, sized.width, sized.height, sized.seed) == ("", 512, 768, 7)
    assert (sized.batch_size, sized.n_iter, sized.subseed_strength) == (2, 3, 0.25)


def test_a_line_s_prompt_joins_the_base_prompt_at_the_start_or_the_end():
    """A1111 1.8+ "Insert prompts at the": a line's prompt before (default) or after the base prompt."""
    start = prompts_from_file_jobs("red\n--steps 3", base(negative_prompt="ugly"))
    assert [job.prompt for job in start] == ["red a photo of a dog", "a photo of a dog"]
    end = prompts_from_file_jobs(
        "red\n--negative_prompt dark", base(negative_prompt="ugly"), prompt_position="end"
    )
    assert end[0].prompt == "a photo of a dog red" and end[1].negative_prompt == "ugly dark"
    with pytest.raises(BoothError, match="prompt position must be start or end"):
        prompts_from_file_jobs("red", base(), prompt_position="middle")


def test_a_plain_prompt_may_contain_double_dashes():
    assert parse_prompt_line("a cat -- a dog --steps 3", 1) == {"prompt": "a cat -- a dog --steps 3"}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("--steps 20 --colour red", "line 2: unknown option --colour"),
        ("--restore_faces true", "line 2: --restore_faces is an A1111 option booth does not support"),
        ("--styles Oil", "line 2: --styles needs the styles.csv"),
        ("--steps many", "line 2: --steps: 'many' is not an integer"),
        ("--prompt", "line 2: missing value for --prompt"),
        ("--steps 20 30", "line 2: expected an option"),
        ("--prompt 'unclosed", "line 2: No closing quotation"),
        ("--steps 0", "line 2: steps must be at least 1"),
    ],
)
def test_prompts_from_file_errors_name_the_line(line, message):
    with pytest.raises(BoothError, match=message):
        prompts_from_file_jobs(f"fine prompt\n{line}\n", base())


def test_prompts_from_file_seed_modes():
    text = "a\nb\n--prompt c --seed 5\nd"
    default = prompts_from_file_jobs(text, base(seed=-1), rng=random.Random(0))
    assert default[2].seed == 5 and len({j.seed for j in default}) == 4 and min(j.seed for j in default) >= 0
    same = prompts_from_file_jobs(text, base(seed=-1), same_seed=True, rng=random.Random(0))
    assert same[0].seed == same[1].seed == same[3].seed and same[2].seed == 5
    it = prompts_from_file_jobs(text, base(seed=10, batch_size=2), iterate_seed=True)
    assert [j.seed for j in it] == [10, 12, 5, 16]


def test_prompts_from_file_needs_a_prompt():
    with pytest.raises(BoothError, match="no prompts"):
        prompts_from_file_jobs("\n  \n", base())


def test_run_prompts_from_file_grids_all_images():
    result = run_prompts_from_file("a\nb\n--prompt c --batch_size 2", base(prompt=""), fake_generate)
    assert len(result.images) == 4 and result.grid.size == (2 * CELL, 2 * CELL)
    assert result.grid.getpixel((CELL // 2, CELL + CELL // 2)) == color_of(base(prompt="c"))


# ---------------------------------------------------------------------------------------------- styles


def test_apply_style_substitutes_or_appends():
    from booth.prompts.styles import apply_styles, merge_prompts

    assert merge_prompts("{prompt}, oil painting", "a cat") == "a cat, oil painting"
    assert merge_prompts("masterpiece, {prompt} in snow", "a cat") == "masterpiece, a cat in snow"
    assert merge_prompts("oil painting", "a cat") == "a cat, oil painting"
    assert merge_prompts("oil painting", "") == "oil painting"
    assert merge_prompts("", "blurry") == "blurry"
    assert apply_styles("cat", ["{prompt} photo", "4k"]) == "cat photo, 4k"


# ---------------------------------------------------------------------------------------------- setting axes


def test_checkpoint_and_vae_axes_set_the_cells_override_settings(tmp_path):
    model = tmp_path / "anime.safetensors"
    model.write_bytes(b"")
    jobs, xl, yl, _ = xyz_grid_jobs(
        base(), "Checkpoint name", f"{model}, org/photo", "VAE", "None, ft-mse.pt"
    )
    assert [[j.override_settings for j in row] for row in jobs[0]] == [
        [
            {"sd_model_checkpoint": str(model), "sd_vae": "None"},
            {"sd_model_checkpoint": "org/photo", "sd_vae": "None"},
        ],
        [
            {"sd_model_checkpoint": str(model), "sd_vae": "ft-mse.pt"},
            {"sd_model_checkpoint": "org/photo", "sd_vae": "ft-mse.pt"},
        ],
    ]
    assert xl == ["anime.safetensors", "org/photo"]  # A1111 `format_remove_path`
    assert yl == ["VAE: None", "VAE: ft-mse.pt"]
    assert base().override_settings == {}  # the base job is left alone


def test_styles_axis_merges_each_value_s_styles(tmp_path):
    from booth.prompts.styles import read_styles

    csv_file = tmp_path / "styles.csv"
    csv_file.write_text('name,prompt,negative_prompt\nOil,"{prompt}, oil painting",blurry\nDark,dark,\n')
    styles = read_styles([csv_file])
    params = base(styles=("Mine",))
    jobs, labels, _, _ = xyz_grid_jobs(params, "Styles", 'Oil, "Oil,Dark"', styles=styles)
    oil, both = jobs[0][0]
    assert (oil.prompt, oil.negative_prompt, oil.styles) == (
        "a photo of a dog, oil painting",
        "blurry",
        ("Mine", "Oil"),
    )
    assert both.prompt == "a photo of a dog, oil painting, dark" and both.styles == ("Mine", "Oil", "Dark")
    assert labels == ["Styles: Oil", "Styles: Oil, Dark"]
    with pytest.raises(BoothError, match="X axis 'Styles': unknown style 'Pastel'; known: Oil, Dark"):
        xyz_grid_jobs(params, "Styles", "Pastel", styles=styles)
    with pytest.raises(BoothError, match="no styles loaded: give the styles.csv"):
        xyz_grid_jobs(params, "Styles", "Oil")


def test_cells_run_grouped_by_checkpoint_after_every_cell_is_checked():
    ran, checked = [], []

    def generate(p):
        ran.append((p.override_settings["sd_model_checkpoint"], p.steps))
        return fake_generate(p)

    def check(p):
        checked.append(p.steps)
        assert not ran, "every cell is checked before any is generated"

    result = run_xy_grid(base(), generate, "Steps", "1, 2", "Checkpoint name", "b, a, b", check=check)
    assert len(checked) == 6
    assert ran == [("b", 1), ("b", 2), ("b", 1), ("b", 2), ("a", 1), ("a", 2)]  # each model loads once
    assert [(j.override_settings["sd_model_checkpoint"], j.steps) for j in result.jobs] == [
        ("b", 1), ("b", 2), ("a", 1), ("a", 2), ("b", 1), ("b", 2),
    ]  # fmt: skip
    assert result.labels["y"] == ["b", "a", "b"]

    def refuse(p):
        raise BoothError(f"model {p.override_settings['sd_model_checkpoint']} not found")

    ran.clear()
    with pytest.raises(BoothError, match="model b not found"):
        run_xy_grid(base(), generate, "Checkpoint name", "b", check=refuse)
    assert ran == []


def test_an_engine_refuses_a_job_that_still_names_a_checkpoint(sd1_engine):
    job = base(steps=1, width=32, height=32, override_settings={"sd_model_checkpoint": "x"})
    with pytest.raises(BoothError, match="this job sets sd_model_checkpoint"):
        sd1_engine.generate(job)


def test_a_prompts_file_line_names_its_checkpoint_and_styles(tmp_path):
    from booth.prompts.styles import read_styles

    csv_file = tmp_path / "styles.csv"
    csv_file.write_text('name,prompt,negative_prompt\nOil,"{prompt}, oil painting",blurry\nDark,dark,\n')
    text = 'a cat\n--prompt a dog --sd_model models/b.safetensors --styles "Oil, Dark"\n--prompt a fox --sd_model a'
    jobs = prompts_from_file_jobs(text, base(prompt=""), styles=read_styles([csv_file]))
    assert [j.override_settings for j in jobs] == [
        {}, {"sd_model_checkpoint": "models/b.safetensors"}, {"sd_model_checkpoint": "a"},
    ]  # fmt: skip
    assert (jobs[1].prompt, jobs[1].negative_prompt, jobs[1].styles) == (
        "a dog, oil painting, dark",
        "blurry",
        ("Oil", "Dark"),
    )
    ran = []
    result = run_prompts_from_file(
        text,
        base(prompt=""),
        lambda p: ran.append(p.prompt) or fake_generate(p),
        styles=read_styles([csv_file]),
    )
    assert ran == [
        "a photo of a dog".replace("a photo of a dog", "a cat"),
        "a dog, oil painting, dark",
        "a fox",
    ]
    assert [j.prompt for j in result.jobs] == ["a cat", "a dog, oil painting, dark", "a fox"]


def test_a1111_s_sampler_and_noise_axes_by_their_labels():
    jobs, labels, _, _ = xyz_grid_jobs(base(sampler_name="Euler"), "Sigma Churn", "0, 0.5")
    assert [j.s_churn for j in jobs[0][0]] == [0.0, 0.5] and labels == ["Sigma Churn: 0", "Sigma Churn: 0.5"]
    for label, field in [
        ("Sigma min", "s_tmin"),
        ("Sigma max", "s_tmax"),
        ("Sigma noise", "s_noise"),
        ("Initial noise multiplier", "initial_noise_multiplier"),
        ("Cond. Image Mask Weight", "inpainting_mask_weight"),
    ]:
        (job,) = xyz_grid_jobs(base(), label, "0.75")[0][0][0]
        assert getattr(job, field) == 0.75, label

"""The embedded default model, dg.load("tiny"): the Shakespeare DiffusionGemma built by tools/make_default_model.py.

* libllama's gemma4 tokenizer (through diffgemma) and the BPE trained with Hugging Face `tokenizers` (stored
  in the file under `tokenizer.huggingface.json`) give identical ids on held-out text and on non-ASCII text;
* denoising accuracy on a held-out excerpt at corruption level 0.5 is above the unigram baseline (and above
  copying the noisy canvas);
* generation after "ROMEO:" is mostly real words.

The held-out excerpt below comes from plays the model was not trained on (Macbeth, The Tempest, Julius Caesar;
public domain, Project Gutenberg via the `shakespeare` package).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import diffgemma as dg

MODEL = dg.resolve("tiny")
HF_TOKENIZER_KEY = "tokenizer.huggingface.json"
# Corrupted-position accuracy over the oracle unigram baseline. The shipped model (55 CPU minutes) reaches
# 1.6x on this excerpt and 1.7x on the larger bench sample (docs/quality.md): clearly above, not far above.
THRESHOLD_FACTOR = 1.3

HELD_OUT = """\
[Enter Macbeth and Banquo.]

MACBETH.
So foul and fair a day I have not seen.

BANQUO.
How far is't call'd to Forres?--What are these
So wither'd, and so wild in their attire,
That look not like the inhabitants o' the earth,
And yet are on't?--Live you? or are you aught
That man may question? You seem to understand me,
By each at once her chappy finger laying
Upon her skinny lips:--you should be women,
And yet your beards forbid me to interpret
That you are so.

MACBETH.
Speak, if you can;--what are you?

FIRST WITCH.
All hail, Macbeth! hail to thee, Thane of Glamis!

SECOND WITCH.
All hail, Macbeth! hail to thee, Thane of Cawdor!

THIRD WITCH.
All hail, Macbeth! that shalt be king hereafter!

BANQUO.
Good sir, why do you start; and seem to fear
Things that do sound so fair?-- I' the name of truth,
Are ye fantastical, or that indeed
Which outwardly ye show? My noble partner
You greet with present grace and great prediction
Of noble having and of royal hope,
That he seems rapt withal:--to me you speak not:
If you can look into the seeds of time,
And say which grain will grow, and which will not,
Speak then to me, who neither beg nor fear
Your favors nor your hate.

FIRST WITCH.
Hail!

SECOND WITCH.
Hail!

THIRD WITCH.
Hail!

FIRST WITCH.
Lesser than Macbeth, and greater.

SECOND WITCH.
Not so happy, yet much happier.

THIRD WITCH.
Thou shalt get kings, though thou be none:
So all hail, Macbeth and Banquo!

FIRST WITCH.
Banquo and Macbeth, all hail!

MACBETH.
Stay, you imperfect speakers, tell me more:

PROSPERO.
[Aside] I had forgot that foul conspiracy
Of the beast Caliban and his confederates
Against my life: the minute of their plot
Is almost come. [To the Spirits.] Well done! avoid; no
more!

FERDINAND.
This is strange: your father's in some passion
That works him strongly.

MIRANDA.
Never till this day
Saw I him touch'd with anger so distemper'd.

PROSPERO.
You do look, my son, in a mov'd sort,
As if you were dismay'd: be cheerful, sir:
Our revels now are ended. These our actors,
As I foretold you, were all spirits and
Are melted into air, into thin air:
And, like the baseless fabric of this vision,
The cloud-capp'd towers, the gorgeous palaces,
The solemn temples, the great globe itself,
Yea, all which it inherit, shall dissolve
And, like this insubstantial pageant faded,
Leave not a rack behind. We are such stuff
As dreams are made on, and our little life
Is rounded with a sleep.--Sir, I am vex'd:
Bear with my weakness; my old brain is troubled.
Be not disturb'd with my infirmity.
If you be pleas'd, retire into my cell
And there repose: a turn or two I'll walk,
To still my beating mind.

FERDINAND, MIRANDA.
We wish your peace.

[Exeunt.]

PROSPERO.
Come, with a thought.--[To them.] I thank thee:
Ariel, come!

[Enter ARIEL.]

ARIEL.
Thy thoughts I cleave to. What's thy pleasure?

ANTONY.
You gentle Romans,--

CITIZENS.
Peace, ho! let us hear him.

ANTONY.
Friends, Romans, countrymen, lend me your ears;
I come to bury Caesar, not to praise him.
The evil that men do lives after them;
The good is oft interred with their bones:
So let it be with Caesar. The noble Brutus
Hath told you Caesar was ambitious:
If it were so, it was a grievous fault;
And grievously hath Caesar answer'd it.
Here, under leave of Brutus and the rest,--
For Brutus is an honourable man;
So are they all, all honorable men,--
Come I to speak in Caesar's funeral.
He was my friend, faithful and just to me:
But Brutus says he was ambitious;
And Brutus is an honourable man.
He hath brought many captives home to Rome,
Whose ransoms did the general coffers fill:
Did this in Caesar seem ambitious?
When that the poor have cried, Caesar hath wept:
Ambition should be made of sterner stuff:
Yet Brutus says he was ambitious;
And Brutus is an honourable man.
You all did see that on the Lupercal
I thrice presented him a kingly crown,
Which he did thrice refuse: was this ambition?
Yet Brutus says he was ambitious;
And, sure, he is an honourable man.
I speak not to disprove what Brutus spoke,
But here I am to speak what I do know.
You all did love him once,--not without cause:
What cause withholds you, then, to mourn for him?--
O judgment, thou art fled to brutish beasts,
And men have lost their reason!--Bear with me;
My heart is in the coffin there with Caesar,
And I must pause till it come back to me.

FIRST CITIZEN.
Methinks there is much reason in his sayings.

SECOND CITIZEN.
If thou consider rightly of the matter,
Caesar has had great wrong.

THIRD CITIZEN.
Has he not, masters?
I fear there will a worse come in his place.

FOURTH CITIZEN.
Mark'd ye his words? He would not take the crown;
Therefore 'tis certain he was not ambitious.

FIRST CITIZEN.
If it be found so, some will dear abide it.

SECOND CITIZEN.
Poor soul! his eyes are red as fire with weeping.

THIRD CITIZEN.
There's not a nobler man in Rome than Antony.

FOURTH CITIZEN.
Now mark him; he begins again to speak.
"""

# The 1000 most frequent words of the training split (lower case), for the generation check.
COMMON_WORDS = frozenset("""
the and i to of a you my in that is not with for me it his be your this he but have as thou him so will what
her thy all by no do shall if are we lord thee on king our good now from o at come sir they she or which more
would well enter was then how their love let here am when them hath than an like one man there go upon may
i'll say make know did were should yet us must why see had out such give some these tis too who where can
first take mine most speak up tell duke time never doth think heart exeunt much queen nor exit day death art
great life away father hear men night made fair sweet hand true look god before thus lady scene very own
master cannot prince eyes pray again old ay been any two son other being blood name heaven leave poor both
down therefore world whose till honour into though ever could done comes nothing grace against nay noble
better fear even still many myself call hast dead way those stand gentleman brother house bear second head
richard live henry john peace part york wife little might find madam lords every die long gloster word off
none servant keep within daughter eye young thine falstaff mistress friends gone himself page place dear unto
soul another put friend hold set france since face warwick best whom bring full fool aside words stay indeed
tongue show dost antony once after faith else boy please said iago that's about ham gentle makes thought marry
has answer three ere welcome right there's without mind forth thing rest hope mother shame hence farewell came
othello truth matter back morrow edward heard power thousand cause home help clown woman news timon nature bid
sword tears what's state end fortune use same messenger act romeo only meet gods earth wilt hands husband bed
rome lie claudio play false rather get things pardon caesar fellow enough re ill rosalind honest fall follow
ford light sure hour thank hither through we'll far shalt lay under cleopatra fight does ye mean yourself last
fire arms hot youth kind shallow turn war high he's reason sent soldier lost majesty new break troilus
buckingham child court seen suffolk cousin wit england body means cassio thoughts prove speed swear justice
while together crown near sea itself yours t each lies saw send left between half margaret foul present
villain lear says mad horse o'er ne'er syracuse don father's wrong titus desdemona beauty desire gave dromio
grief found spirit valentine letter let's gold proteus sleep law french sun proud seek told beseech antipholus
pity fly nurse clarence coriolanus room looks others gentlemen believe petruchio alone land breath angelo wish
over third sit save business strange care royal ha knows happy age days times cold worth alas hector bastard
mrs helena menenius benedick lose less joy bloody service worthy brought sorrow general uncle berowne juliet
devil charge return lives sound purpose company soldiers yes kill music draw mark sight bardolph kent holy
talk quickly ah friar born side because wear maid thyself pandarus here's ear lucius virtue cry pistol
pericles dare gracious patience kiss late loves neither read yea ephesus praise princess further strong
highness field cressida serve people wind foot bolingbroke black ho anne years run parolles work sin known
grave sad sake trust need money mercy sister given pleasure hate heavy comfort free something warrant orlando
achilles rich bound canst demetrius goes remember haste doubt either fault host weep seem merry thanks paris
hell air leonato self captain base deep cut hearts ii behold ask attendants white certain beatrice next ears
sons ring hard ground didst talbot isabella king's course antonio pedro command knave truly twenty watch sick
knew straight content english having themselves coming change women wise hang guard enobarbus gives is't
stands fie woe fal portia duty she's revenge married unless oath northumberland cardinal ten you'll capulet
emilia voice dog man's strike ladies hastings leontes fit past took open somerset julia soon worse arm earl
sovereign salisbury palace almost de oft methinks brave duchess tranio lest just tender common hours yield
door valiant pale eat deed water lips marcius twas withal em question bertram spoke needs pass person sicinius
clifford enemy above city liege presently lucio want wars flesh already bold ready knight note call'd marcus
sirrah sing five drink norfolk apemantus chamber report signior grow suit four sworn country fast ajax pay iii
met heavens pompey celia counsel wherein rage lead hark become sense deny point wouldst moon charles
gloucester thersites silvia camillo god's confess wherefore glad saint brutus slain london pretty fare office
slave appear armado lucentio pride loving traitor pr'ythee bassanio william letters lov'd witness elizabeth
hortensio whole costard lafeu countess loss marriage plain mouth speaks citizen conscience glou anon town hero
provost bad behind strength sport deeds ulysses got fell living often vile lordship win morning soft takes
speech dull flourish bosom simple seems action kings green princes bianca attend beat iv shepherd katherina
favour th wonder caius hor write hundred dream march tale slender posthumus imogen parts whilst hostess
baptista harry begin force walk teach longer touch shows heir hair short bawd kate evans case along charmian
lancaster shylock excellent dies honourable entreat fetch presence ourselves fortunes breast souls hamlet
roderigo widow silence weak herself writ worst twere officer cominius jest issue enemies heads chief offence
battle servants troy children form dauphin wolsey boyet rosaline marina kept spirits mighty moth gratiano
lysander going pluck bless faults grant awhile deliver quick stop book curse virtuous hide lend feast roman
cast murder masters edg besides choose quoth passion adieu he'll close bears murderer s cade aaron whether
gainst promise respect feel citizens escalus bottom won aufidius exeter hermia grumio beg health consent hadst
troth forward where's small chance mortal scorn died toward iachimo westmoreland hubert lion least stood throw
noise buy piece gates kill'd agamemnon gremio tamora
""".split())

EXOTIC = ["café naïve résumé", "Ünïcödé — “quotes” ‘single’ …", "漢字 and 日本語", "emoji 😀🎭", "tab\there",
          "  leading spaces", "trailing  ", "\r\nwindows\r\n", "mixed\n\n\nnewlines\n \n", "\u00a0nbsp",
          "zero\u200bwidth", "e\u0301 combining", "ﬁ ligature", "\x00nul\x7f", "▁ literal metaspace",
          "<|turn>user\nhi<turn|>", "<bos>x<eos><pad><mask>"]


@pytest.fixture(scope="module")
def model() -> Iterator[dg.Model]:
    m = dg.load(MODEL, n_gpu_layers=0)
    yield m
    m.close()


@pytest.fixture(scope="module")
def trained_tokenizer(model: dg.Model) -> Any:
    from tokenizers import Tokenizer

    js = model.metadata.get(HF_TOKENIZER_KEY)
    assert isinstance(js, str), f"{MODEL.name} lacks {HF_TOKENIZER_KEY}"
    return Tokenizer.from_str(js)


def test_structure(model: dg.Model) -> None:
    hp = model.hparams
    assert MODEL.stat().st_size <= 25_000_000
    assert hp.n_embd % 256 == 0 and hp.n_expert > hp.n_expert_used > 1
    assert hp.swa_layers[-1] is False and any(hp.swa_layers)  # sliding layers, the last one global
    assert model.tokenizer.n_vocab == hp.n_vocab
    assert "tokenizer.chat_template" not in model.metadata  # a base model: plain prompts are continued


def test_tokenizer_agrees_on_held_out_lines(model: dg.Model, trained_tokenizer: Any) -> None:
    lines = HELD_OUT.split("\n")
    assert len(lines) > 150
    for line in lines:
        assert model.tokenize(line, add_special=False) == trained_tokenizer.encode(line, add_special_tokens=False).ids
    whole = model.tokenize(HELD_OUT, add_special=False)
    assert whole == trained_tokenizer.encode(HELD_OUT, add_special_tokens=False).ids
    assert model.tokenize(HELD_OUT) == trained_tokenizer.encode(HELD_OUT).ids  # BOS added by both


@pytest.mark.parametrize("text", EXOTIC)
def test_tokenizer_agrees_on_exotic_text(model: dg.Model, trained_tokenizer: Any, text: str) -> None:
    ids = model.tokenize(text, add_special=False)
    assert ids == trained_tokenizer.encode(text, add_special_tokens=False).ids
    back = model.detokenize(ids, special=True)
    assert back == trained_tokenizer.decode(ids, skip_special_tokens=False)
    # A literal "▁" is the space marker itself, so it reads back as a space (in both tokenizers).
    assert back == text.replace("▁", " ")


def test_held_out_denoising_beats_unigram(model: dg.Model) -> None:
    ids = np.array(model.tokenize(HELD_OUT, add_special=False))
    L, V = model.hparams.canvas_length, model.hparams.n_vocab
    rng = np.random.default_rng(0)
    n_win = 40
    hits = hits_all = n = 0
    clean_all = []
    for o in np.linspace(0, len(ids) - 32 - L, n_win).astype(int):
        prompt = np.concatenate([[model.tokenizer.bos], ids[o:o + 32]])
        clean = ids[o + 32:o + 32 + L]
        corrupt = rng.random(L) < 0.5
        noisy = np.where(corrupt, rng.integers(0, V, L), clean)
        pred = model.logits(prompt, noisy).argmax(-1)
        hits += int((pred == clean)[corrupt].sum())
        hits_all += int((pred == clean).sum())
        n += int(corrupt.sum())
        clean_all.append(clean[corrupt])
    acc, acc_all = hits / n, hits_all / (n_win * L)
    # An oracle unigram baseline: the most frequent token of these very positions (>= the train-unigram one).
    unigram = np.bincount(np.concatenate(clean_all)).max() / n
    assert acc > THRESHOLD_FACTOR * unigram, (acc, unigram)
    # All positions: above copying the noisy canvas (which scores the uncorrupted share, ~0.5).
    assert acc_all > 1 - n / (n_win * L) + 0.01, acc_all


def test_generate_romeo_is_mostly_words(model: dg.Model) -> None:
    g = model.generate("ROMEO:", max_new_tokens=64, seed=0)
    words = [w.lower() for w in re.findall(r"[A-Za-z]+(?:'[A-Za-z]+)*", g.text)]
    assert len(words) >= 20, g.text
    common = sum(w in COMMON_WORDS for w in words) / len(words)
    assert common >= 0.6, (common, g.text)
